#!/usr/bin/env python3
"""Where one kernel's warps wait, from Nsight Compute's source page (KERNEL=regex scripts/gpu-kernels.sh
writes it).

usage: stall-report.py [--top K] FILE.csv

The CSV is `ncu --import REPORT --page source --csv --print-source sass`: one row per SASS instruction with
its warp-state samples. The report gives the kernel's stall reasons overall, then the kernel cut into
regions at its block barriers (BAR.SYNC): samples, executions and the leading reasons of each, so that a
phase between two __syncthreads can be told from the next; then the K instructions with most samples.

A barrier's waiting is booked on the instruction after it, and while one warp of a block works alone
(a row's LayerNorm) the others' samples pile up there: a region's `barrier` samples measure how long the
block waited for its slowest warp, not work.
"""
import argparse
import collections
import csv
import sys


def read(path):
    rows = list(csv.reader(open(path, newline="")))
    header_at = next((i for i, r in enumerate(rows) if "Source" in r and "# Samples" in r), None)
    if header_at is None:
        sys.exit(f"{path}: no 'Source' and '# Samples' columns: is it ncu's source page as CSV (--print-source sass)?")
    header = rows[header_at]
    col = {name: i for i, name in enumerate(header)}
    stalls = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    kernel = rows[0][1] if header_at > 0 and len(rows[0]) > 1 else "?"
    instructions = []
    for r in rows[header_at + 1:]:
        if len(r) < len(header):
            continue
        number = lambda name: int(float(r[col[name]] or 0)) if name in col else 0
        instructions.append({
            "address": r[col["Address"]] if "Address" in col else "",
            "source": r[col["Source"]].strip(),
            "samples": number("# Samples"),
            "executed": number("Instructions Executed"),
            "stalls": {s[len("stall_"):]: number(s) for s in stalls},
        })
    return kernel, instructions


def leading(stalls, k=3):
    top = sorted(((v, s) for s, v in stalls.items() if v), reverse=True)[:k]
    return ", ".join(f"{s} {v}" for v, s in top) or "-"


def regions(instructions):
    """Runs of instructions ended by a block barrier (the barrier belongs to the run it ends)."""
    run = []
    for n, ins in enumerate(instructions):
        run.append((n, ins))
        if ins["source"].startswith("BAR.SYNC") or " BAR.SYNC" in ins["source"]:
            yield run
            run = []
    if run:
        yield run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv")
    parser.add_argument("--top", type=int, default=15, help="instructions listed by samples (default 15)")
    args = parser.parse_args()
    kernel, instructions = read(args.csv)
    total = sum(i["samples"] for i in instructions)
    print(f"kernel: {kernel[:140]}")
    print(f"{len(instructions)} SASS instructions, {total} warp samples")
    overall = collections.Counter()
    for ins in instructions:
        overall.update(ins["stalls"])
    print("stall reasons: " + ", ".join(f"{s} {v} ({100 * v / max(total, 1):.0f} %)"
                                        for s, v in overall.most_common(8) if v))
    print("\nregions (cut at BAR.SYNC; samples of a barrier's wait land on the instruction after it):")
    print(f"{'instructions':>14} {'executed':>9} {'samples':>8} {'share':>6}  leading reasons")
    for run in regions(instructions):
        samples = sum(ins["samples"] for _, ins in run)
        executed = sum(1 for _, ins in run if ins["executed"])
        reasons = collections.Counter()
        for _, ins in run:
            reasons.update(ins["stalls"])
        span = f"{run[0][0]}-{run[-1][0]}"
        print(f"{span:>14} {executed:>9} {samples:>8} {100 * samples / max(total, 1):>5.0f}%  {leading(reasons)}")
    print(f"\nthe {args.top} instructions with most samples:")
    ranked = sorted(enumerate(instructions), key=lambda t: -t[1]["samples"])[:args.top]
    for n, ins in sorted(ranked):
        print(f"{n:>6}  {ins['source'][:56]:<56} {ins['samples']:>6}  {leading(ins['stalls'], 2)}")


if __name__ == "__main__":
    main()
