#!/usr/bin/env python3
"""Markdown report of a benchmark run (scripts/gpu-bench.sh): muse's Phase 7, Phase 8 and arch=gpt models
and the PyTorch peer side by side, per mode and model size, with ratios, MFU, the long-context line,
decode and every error.

usage: bench-report.py [JSONL ...] [--meta META.json ...] [--plot PREFIX] [--peak-tflops 788]
  JSONL       record files (default: docs/bench/*.jsonl of this checkout)
  --meta      the run's meta.json, repeatable (default: every meta*.json beside the JSONL files: gpu-bench.sh
              writes meta.json, or meta-muse.json and meta-peers.json when run as two parts)
  --plot P    also write P.dat and P.gp (gnuplot: forward tokens/s against N, log-x, one line per model at
              B=1 and at the largest B measured at each N), and run gnuplot to make P.png if it is on PATH

Python standard library only. Records are what `muse bench --json` and bench/peers/gpt_pytorch.py print,
with the "label" and "group" fields gpu-bench.sh adds (inferred here when absent).
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys

MODELS = ["phase7", "phase8", "gpt", "peer-gpt"]  # column order
MODEL_TITLES = {"phase7": "phase7", "phase8": "phase8", "gpt": "muse gpt", "peer-gpt": "peer (PyTorch)"}
SHORT = {"phase7": "phase7", "phase8": "phase8", "gpt": "gpt", "peer-gpt": "peer"}
SIZE_TITLES = {"small": "small (D=512, L=8, H=8)", "medium": "medium (D=1024, L=16, H=16)"}
RATIOS = [("phase8", "peer-gpt"), ("phase7", "peer-gpt"), ("gpt", "peer-gpt"), ("phase8", "gpt")]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", help="JSONL record files (default docs/bench/*.jsonl)")
    p.add_argument("--meta", action="append",
                   help="meta.json of the run, repeatable (default: every meta*.json beside the JSONL files)")
    p.add_argument("--plot", metavar="PREFIX", help="write PREFIX.dat, PREFIX.gp and (with gnuplot) PREFIX.png")
    p.add_argument("--peak-tflops", type=float, default=788.0,
                   help="peak bf16 TFLOP/s for MFU (default 788: an H200, measured)")
    return p.parse_args(argv)


# ---- loading ------------------------------------------------------------------------------------------------

def infer_label(rec):
    """The model label of a record: gpu-bench.sh's "label", else from the preset."""
    if rec.get("label"):
        return rec["label"]
    preset = str(rec.get("preset", "?"))
    return preset


def split_label(label):
    """'phase8-small' -> ('phase8', 'small'); 'peer-gpt-medium' -> ('peer-gpt', 'medium')."""
    model, _, size = label.rpartition("-")
    if not model:
        return label, ""
    return model, size


def infer_group(rec):
    if rec.get("group"):
        return rec["group"]
    mode, b, n = rec.get("mode"), rec.get("batch") or 0, rec.get("seq") or 0
    if mode == "decode":
        return "decode"
    if n > 1024:
        return "long"
    return "throughput" if b * n >= 32768 else "grid"


def load(files):
    records, bad = [], 0
    for path in files:
        with open(path, errors="replace") as f:
            for line_no, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    bad += 1
                    continue
                if not isinstance(rec, dict):
                    bad += 1
                    continue
                rec["label"] = infer_label(rec)
                rec["model"], rec["size"] = split_label(rec["label"])
                rec["group"] = infer_group(rec)
                rec["_source"] = f"{os.path.basename(path)}:{line_no}"
                records.append(rec)
    return records, bad


def best_records(records):
    """One record per (label, mode, batch, seq): the last success, else the last error."""
    chosen = {}
    for rec in records:
        key = (rec["label"], rec.get("mode"), rec.get("batch"), rec.get("seq"))
        old = chosen.get(key)
        if old is None or "error" not in rec or "error" in old:
            chosen[key] = rec
    return chosen


# ---- formatting ---------------------------------------------------------------------------------------------

def fmt_int(x):
    return f"{x:,.0f}"


def fmt_num(x, digits=1):
    return f"{x:,.{digits}f}"


def cell_error(rec):
    err = str(rec.get("error", ""))
    if err == "oom":
        return "OOM"
    if err.startswith("timeout"):
        return "timeout"
    if err.startswith("skipped"):
        return "skipped"
    return "error"


def mfu(rec, peak_tflops):
    if not str(rec.get("device", "")).startswith("cuda") or not isinstance(rec.get("gflop_per_s"), (int, float)):
        return None
    return rec["gflop_per_s"] / (peak_tflops * 1000.0) * 100.0


def table(header, rows, align=None):
    align = align or ["r"] * len(header)
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---:" if a == "r" else ":---" for a in align) + "|"]
    for row in rows:
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


# ---- sections -----------------------------------------------------------------------------------------------

def meta_section(metas, files, bad_lines):
    lines = ["# muse benchmark report", ""]
    for path, meta in metas:
        if len(metas) > 1:
            lines.append(f"From `{os.path.basename(path)}`:")
            lines.append("")
        facts = [
            ("GPU", " / ".join(x for x in (meta.get("gpu"), meta.get("gpu_memory"), meta.get("driver") and
                                           f"driver {meta.get('driver')}") if x)),
            ("muse", (meta.get("muse_version") or "").splitlines()[0] if meta.get("muse_version") else None),
            ("commit", meta.get("muse_commit")),
            ("torch (peer)", meta.get("torch")),
            ("device", meta.get("device")),
            ("part", meta.get("part") if meta.get("part") not in (None, "all") else None),
            ("started", meta.get("started")),
            ("wall time", f"{meta['wall_s']} s" if "wall_s" in meta else None),
        ]
        settings = meta.get("settings") or {}
        if settings:
            keys = ("grid", "iters", "warmup", "peer_iters", "peer_warmup", "peer_args", "timeout", "budget_s")
            facts.append(("settings", ", ".join(f"{k}={settings[k]}" for k in keys if settings.get(k, "") != "")))
        for name, value in facts:
            if value:
                lines.append(f"* **{name}**: {value}")
        lines.append("")
    lines.append(f"Records: {', '.join(files)}" + (f" ({bad_lines} unreadable lines skipped)." if bad_lines else "."))
    lines += ["", "tokens/s = B·N / median time per iteration (forward: B×N×Vp bf16 logits written; train: one "
              "optimizer step). Peak MiB = allocator high-water mark, weights included. MFU = achieved FLOP/s "
              "(SPEC §7 count) / peak bf16. Ratios > 1 mean the first model is faster. muse gpt = "
              "`-p phase8-SIZE --set arch=gpt --set ffn=dense` (HTT embedding, ALiBi); peer = "
              "bench/peers/gpt_pytorch.py (dense tied embedding, learned positions, SDPA, torch.compile; "
              "'(eager)' marks a peer number measured without it).", ""]
    return lines


def grid_sections(chosen, peak_tflops):
    lines = []
    for mode in ("forward", "train"):
        for size in ("small", "medium"):
            recs = [r for r in chosen.values() if r.get("mode") == mode and r["size"] == size
                    and r["group"] in ("grid", "throughput")]
            if not recs:
                continue
            models = [m for m in MODELS if any(r["model"] == m for r in recs)]
            extra = sorted({r["model"] for r in recs} - set(MODELS))
            models += extra
            shapes = sorted({(r.get("batch"), r.get("seq")) for r in recs}, key=lambda s: (s[1] or 0, s[0] or 0))
            by = {(r["model"], r.get("batch"), r.get("seq")): r for r in recs}
            ratios = [(a, b) for a, b in RATIOS if a in models and b in models]

            lines += [f"## {mode} — {SIZE_TITLES.get(size, size)}", ""]
            header = ["B", "N"] + [f"{MODEL_TITLES.get(m, m)} tok/s" for m in models]
            header += [f"{SHORT.get(a, a)}/{SHORT.get(b, b)}" for a, b in ratios]
            rows = []
            for b, n in shapes:
                row = [str(b), str(n)]
                for m in models:
                    r = by.get((m, b, n))
                    row.append("—" if r is None else cell_error(r) if "error" in r else
                               fmt_int(r["tokens_per_s"]) + (" (eager)" if r.get("compiled") is False else ""))
                for a, c in ratios:
                    ra, rc = by.get((a, b, n)), by.get((c, b, n))
                    if ra and rc and "error" not in ra and "error" not in rc and rc.get("tokens_per_s"):
                        row.append(f"{ra['tokens_per_s'] / rc['tokens_per_s']:.2f}×")
                    else:
                        row.append("—")
                rows.append(row)
            lines += [table(header, rows), ""]

            header = ["B", "N"] + [f"{MODEL_TITLES.get(m, m)} MiB" for m in models]
            header += [f"{MODEL_TITLES.get(m, m)} MFU %" for m in models]
            rows = []
            for b, n in shapes:
                row = [str(b), str(n)]
                mem, util = [], []
                for m in models:
                    r = by.get((m, b, n))
                    if r is None or "error" in r:
                        mem.append("—" if r is None else cell_error(r))
                        util.append("—")
                        continue
                    pm = r.get("peak_mem_mb")
                    mem.append(fmt_int(pm) if isinstance(pm, (int, float)) else "—")
                    u = mfu(r, peak_tflops)
                    util.append(fmt_num(u) if u is not None else "—")
                rows.append(row + mem + util)
            lines += [table(header, rows), ""]
    return lines


def long_section(chosen):
    """Forward at B=1 against N for every model that has a long-context record (grid B=1 rows included)."""
    lines = []
    for size in ("small", "medium"):
        long_models = {r["model"] for r in chosen.values()
                       if r["group"] == "long" and r["size"] == size and r.get("mode") == "forward"}
        if not long_models:
            continue
        models = [m for m in MODELS if m in long_models] + sorted(long_models - set(MODELS))
        recs = {(r["model"], r.get("seq")): r for r in chosen.values()
                if r.get("mode") == "forward" and r["size"] == size and r.get("batch") == 1 and r["model"] in models}
        seqs = sorted({n for _, n in recs})
        lines += [f"## Long context — forward, B=1, {SIZE_TITLES.get(size, size)}", ""]
        header = ["N"]
        for m in models:
            header += [f"{MODEL_TITLES.get(m, m)} tok/s", f"{MODEL_TITLES.get(m, m)} ms", f"{MODEL_TITLES.get(m, m)} MiB"]
        has_ratio = "phase8" in models and "peer-gpt" in models
        if has_ratio:
            header.append("phase8/peer")
        rows = []
        for n in seqs:
            row = [fmt_int(n)]
            for m in models:
                r = recs.get((m, n))
                if r is None:
                    row += ["—", "—", "—"]
                elif "error" in r:
                    row += [cell_error(r), "—", "—"]
                else:
                    pm = r.get("peak_mem_mb")
                    row += [fmt_int(r["tokens_per_s"]) + (" (eager)" if r.get("compiled") is False else ""),
                            fmt_num(r["median_ms"], 2),
                            fmt_int(pm) if isinstance(pm, (int, float)) else "—"]
            if has_ratio:
                a, c = recs.get(("phase8", n)), recs.get(("peer-gpt", n))
                ok = a and c and "error" not in a and "error" not in c and c.get("tokens_per_s")
                row.append(f"{a['tokens_per_s'] / c['tokens_per_s']:.2f}×" if ok else "—")
            rows.append(row)
        lines += [table(header, rows), ""]
        notes = sorted({r["label"] for r in recs.values() if "max_seq=" in str(r.get("command", ""))})
        if notes:
            lines += [f"({', '.join(notes)}: learned position table lengthened with `--set max_seq=N` for N > 1024.)",
                      ""]
    return lines


def decode_section(chosen):
    recs = [r for r in chosen.values() if r.get("mode") == "decode"]
    if not recs:
        return []
    recs.sort(key=lambda r: (MODELS.index(r["model"]) if r["model"] in MODELS else 99, r["size"],
                             r.get("batch") or 0, r.get("context") or r.get("seq") or 0))
    rows = []
    for r in recs:
        ctx = r.get("context", r.get("seq"))
        row = [r["label"], str(r.get("batch")), fmt_int(ctx) if isinstance(ctx, (int, float)) else "?"]
        if "error" in r:
            row += [cell_error(r), "—", "—", "—"]
        else:
            pm = r.get("peak_mem_mb")
            row += [fmt_int(r["tokens_per_s"]), fmt_num(r.get("tokens_per_s_per_stream", 0), 1),
                    fmt_num(r["median_ms"], 3), fmt_int(pm) if isinstance(pm, (int, float)) else "—"]
        rows.append(row)
    header = ["model", "streams", "context", "tok/s total", "tok/s per stream", "ms/step", "peak MiB"]
    return ["## Decode", "", table(header, rows, ["l", "r", "r", "r", "r", "r", "r"]), ""]


def error_section(records):
    errs = [r for r in records if "error" in r]
    if not errs:
        return ["## Errors", "", "None.", ""]
    rows = []
    for r in errs:
        tail = r.get("stderr_tail") or []
        detail = tail[-1] if tail else r.get("message", "")
        rows.append([r["label"], str(r.get("mode")), str(r.get("batch")), str(r.get("seq")),
                     str(r["error"]).replace("|", "\\|"), str(detail).replace("|", "\\|")[:200],
                     f"`{r['command']}`" if r.get("command") else ""])
    header = ["model", "mode", "B", "N", "error", "last stderr line", "command"]
    return ["## Errors", "", table(header, rows, ["l", "l", "r", "r", "l", "l", "l"]), ""]


# ---- plot ---------------------------------------------------------------------------------------------------

def write_plot(chosen, prefix):
    """PREFIX.dat (one gnuplot data block per line) and PREFIX.gp; runs gnuplot when present."""
    fwd = [r for r in chosen.values() if r.get("mode") == "forward" and "error" not in r]
    blocks = []  # (size, model, kind, [(N, tok/s, B)])
    for size in ("small", "medium"):
        models = [m for m in MODELS if any(r["model"] == m and r["size"] == size for r in fwd)]
        models += sorted({r["model"] for r in fwd if r["size"] == size} - set(MODELS))
        for m in models:
            mine = [r for r in fwd if r["model"] == m and r["size"] == size]
            b1 = sorted((r["seq"], r["tokens_per_s"], 1) for r in mine if r.get("batch") == 1)
            top = {}
            for r in mine:
                n, b = r["seq"], r["batch"]
                if b > 1 and (n not in top or b > top[n][2]):
                    top[n] = (n, r["tokens_per_s"], b)
            if b1:
                blocks.append((size, m, "B=1", b1))
            if top:
                blocks.append((size, m, "largest B", [top[n] for n in sorted(top)]))
    base = os.path.basename(prefix)
    with open(prefix + ".dat", "w") as f:
        for i, (size, m, kind, pts) in enumerate(blocks):
            if i:
                f.write("\n\n")
            f.write(f"# index {i}: {m}-{size}, {kind}\n# N tokens_per_s B\n")
            for n, tps, b in pts:
                f.write(f"{n} {tps:.3f} {b}\n")
    sizes = [s for s in ("small", "medium") if any(bl[0] == s for bl in blocks)]
    colors = {"phase7": "#1f77b4", "phase8": "#d62728", "gpt": "#2ca02c", "peer-gpt": "#7f7f7f"}
    gp = [
        "# gnuplot script written by scripts/bench-report.py: forward tokens/s against sequence length.",
        f"# Run it in this directory: gnuplot {base}.gp  (writes {base}.png)",
        'if (strstrt(GPVAL_TERMINALS, "pngcairo") > 0) {',
        f"  set terminal pngcairo size {760 * max(1, len(sizes))},640 font \",10\"",
        "} else {",
        f"  set terminal png size {760 * max(1, len(sizes))},640",
        "}",
        f"set output '{base}.png'",
        "set logscale x 2",
        "set logscale y 10",
        "set grid",
        "set xlabel 'sequence length N'",
        "set ylabel 'forward tokens/s'",
        "set key below maxrows 4 width -2 font ',8'",
        "set format y '%.0s%c'",
        f"set multiplot layout 1,{max(1, len(sizes))} title 'muse bench: forward throughput "
        "(solid: B=1, dashed: largest B measured at each N)'",
    ]
    for size in sizes:
        terms = []
        for i, (s, m, kind, pts) in enumerate(blocks):
            if s != size:
                continue
            color = colors.get(m, "#9467bd")
            dash = 1 if kind == "B=1" else 2
            title = f"{m}-{s} {kind}"
            terms.append(f"'{base}.dat' index {i} using 1:2 with linespoints lc rgb '{color}' dt {dash} pt 7 ps 0.6 "
                         f"title '{title}'")
        gp.append(f"set title '{SIZE_TITLES.get(size, size)}'")
        gp.append("plot " + ", \\\n     ".join(terms))
    gp.append("unset multiplot")
    with open(prefix + ".gp", "w") as f:
        f.write("\n".join(gp) + "\n")
    if not blocks:
        print(f"bench-report.py: no forward records to plot; {prefix}.gp is empty of lines", file=sys.stderr)
        return
    gnuplot = shutil.which("gnuplot")
    if gnuplot:
        res = subprocess.run([gnuplot, base + ".gp"], cwd=os.path.dirname(os.path.abspath(prefix)),
                             capture_output=True, text=True)
        if res.returncode != 0:
            print(f"bench-report.py: gnuplot failed: {res.stderr.strip()}", file=sys.stderr)
        else:
            print(f"bench-report.py: wrote {prefix}.png", file=sys.stderr)
    else:
        print(f"bench-report.py: gnuplot not on PATH; run 'gnuplot {base}.gp' in {os.path.dirname(prefix) or '.'}",
              file=sys.stderr)


# ---- main ---------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    files = args.files
    if not files:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        files = sorted(glob.glob(os.path.join(root, "docs", "bench", "*.jsonl")))
        if not files:
            print("bench-report.py: no JSONL files given and none in docs/bench/", file=sys.stderr)
            return 2
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        print(f"bench-report.py: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    meta_paths = args.meta
    if meta_paths is None:
        meta_paths = []
        for f in files:
            for candidate in sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(f)), "meta*.json"))):
                if candidate not in meta_paths:
                    meta_paths.append(candidate)
    metas = []
    for path in meta_paths:
        try:
            with open(path) as f:
                metas.append((path, json.load(f)))
        except (OSError, ValueError) as exc:
            print(f"bench-report.py: cannot read {path}: {exc}", file=sys.stderr)

    records, bad = load(files)
    chosen = best_records(records)
    lines = meta_section(metas, files, bad)
    lines += grid_sections(chosen, args.peak_tflops)
    lines += long_section(chosen)
    lines += decode_section(chosen)
    lines += error_section(list(chosen.values()))
    sys.stdout.write("\n".join(lines).rstrip() + "\n")
    if args.plot:
        write_plot(chosen, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
