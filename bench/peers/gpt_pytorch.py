#!/usr/bin/env python3
"""PyTorch GPT-2-style baseline for `muse bench` (SPEC §7, bench/peers/).

A plain pre-LayerNorm Transformer of the same width and depth as muse's small / medium presets, written
for this project: a tied token embedding (Vp = 50,304 rows, the GPT-2 vocabulary of 50,257 padded to a
multiple of 128; padded rows are zero and never reach the loss), learned positions, causal self-attention
through torch.nn.functional.scaled_dot_product_attention(is_causal=True), a 4·D GELU MLP, a final
LayerNorm and the tied head. torch.compile by default.

It measures what `muse bench` measures and prints one JSON line per shape with the same fields:
  forward  B×N×Vp bf16 logits written to device memory, from bf16 weights, under torch.no_grad();
  train    one optimizer step: forward (bf16 autocast over fp32 master weights), cross-entropy in fp32,
           backward, clip_grad_norm_(1.0), AdamW (fused when available), zero_grad(set_to_none=True).
Each shape: warm-up iterations (compilation happens there), then timed iterations, each synchronised
(torch.cuda.synchronize around a perf_counter interval); the median is reported. Peak memory is
torch.cuda.max_memory_allocated over the timed iterations after reset_peak_memory_stats, so it includes
everything resident then: weights (and, for train, fp32 master weights and AdamW state).
FLOPs are counted as SPEC §7 counts them for muse's arch=gpt block:
  per layer 2·rows·(4D² + 8D²) + 4·d_h·H·pairs, pairs = B·N(N+1)/2;  head 2·rows·D·Vp;  ×3 for train.
"""

import argparse
import gc
import json
import math
import random
import statistics
import sys
import time

VOCAB = 50257
PADDED_VOCAB = 50304  # VOCAB rounded up to a multiple of 128 (SPEC §2.1)

SIZES = {
    "small": {"d_model": 512, "n_layers": 8, "n_heads": 8},  # phase7-small / phase8-small
    "medium": {"d_model": 1024, "n_layers": 16, "n_heads": 16},  # phase7-medium / phase8-medium
}

# SPEC §7's grid plus the throughput shapes that scripts/gpu-bench.sh runs for muse.
SPEC_GRID = {
    "small": [(1, 256), (2, 256), (4, 256), (8, 256), (1, 512), (2, 512), (4, 512), (1, 1024), (2, 1024),
              (32, 1024), (64, 1024)],
    "medium": [(1, 512), (2, 512), (4, 512), (1, 1024), (32, 1024)],
}

COMPILE_MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


def parse_grid(text):
    """'B:N,B:N,...' (or BxN) -> [(B, N), ...]."""
    shapes = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        sep = ":" if ":" in item else "x"
        parts = item.split(sep)
        if len(parts) != 2:
            raise argparse.ArgumentTypeError(f"grid item '{item}': expected B:N")
        try:
            b, n = int(parts[0]), int(parts[1])
        except ValueError:
            raise argparse.ArgumentTypeError(f"grid item '{item}': B and N must be integers") from None
        if b < 1 or n < 1:
            raise argparse.ArgumentTypeError(f"grid item '{item}': B and N must be positive")
        shapes.append((b, n))
    if not shapes:
        raise argparse.ArgumentTypeError("empty grid")
    return shapes


def gflop_per_iter(size, batch, seq, mode):
    """SPEC §7 FLOP count of one iteration, in GFLOP (the count muse uses for arch=gpt, minus HTT)."""
    cfg = SIZES[size]
    d, n_layers, n_heads = cfg["d_model"], cfg["n_layers"], cfg["n_heads"]
    d_head = d // n_heads
    rows = batch * seq
    pairs = batch * seq * (seq + 1) / 2
    per_layer = 2.0 * rows * (4 * d * d + 8 * d * d) + 4.0 * d_head * pairs * n_heads
    flops = n_layers * per_layer + 2.0 * rows * d * PADDED_VOCAB
    return flops * (3 if mode == "train" else 1) / 1e9


def make_parser():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + "\n\nMeasures forward or train-step throughput and peak memory of "
        "a GPT-2-style Transformer with muse's small/medium width and depth, one JSON line per shape "
        "(fields as `muse bench --json`, plus torch, compiled, ...). A shape that runs out of memory prints "
        '{"error": "oom", ...} and the run goes on.',
        epilog="examples:\n"
        "  gpt_pytorch.py --size small --mode forward --grid 1:256,8:256,1:1024\n"
        "  gpt_pytorch.py --size medium --mode train          # SPEC §7 medium grid + B=32 N=1024\n"
        "  gpt_pytorch.py --size small --mode forward -b 1 -n 16384 --no-compile",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="small",
                   help="small: D=512 L=8 H=8; medium: D=1024 L=16 H=16 (default small)")
    p.add_argument("--mode", choices=["forward", "train"], default="forward", help="default forward")
    p.add_argument("--grid", type=parse_grid, default=None,
                   help="shapes 'B:N,B:N,...' run in this one process (default: SPEC §7's grid for --size, "
                   "with the throughput shapes)")
    p.add_argument("-b", "--batch", type=int, default=None, help="one shape: batch size (with -n)")
    p.add_argument("-n", "--seq", type=int, default=None, help="one shape: sequence length (with -b)")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed iterations per shape, compilation included (default 3; at least 1 when compiled)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per shape; the median is reported "
                   "(default 10)")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:K or cpu (cpu: for checking the script)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="run eagerly, without torch.compile")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default", help="torch.compile mode "
                   "(default 'default')")
    p.add_argument("--static-shapes", action="store_true",
                   help="compile each shape separately with dynamic=False (slower start-up: one compilation per "
                   "shape); default: one compilation with dynamic=True, sizes 1 specialised by torch")
    p.add_argument("--max-pos", type=int, default=None,
                   help="rows of the learned position table (default max(1024, largest N of the run))")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate for train (default 1e-4, as muse bench)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and token ids (default 0)")
    return p


def log(msg):
    print(f"[gpt_pytorch] {msg}", file=sys.stderr, flush=True)


def define_model(torch):
    """The model classes, defined once torch is imported (so that --help works without torch)."""
    nn = torch.nn
    F = torch.nn.functional
    has_sdpa = hasattr(F, "scaled_dot_product_attention")

    def causal_attention(q, k, v):
        if has_sdpa:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        # Only for torch < 2.0 (no SDPA): explicit masked softmax, so the script can still be checked there.
        n = q.shape[-2]
        scores = torch.matmul(q, k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        probs = scores.masked_fill(mask, float("-inf")).softmax(dim=-1).to(v.dtype)
        return torch.matmul(probs, v)

    class Block(nn.Module):
        """Pre-LN block: x += W_o·attn(LN(x)); x += MLP(LN(x))."""

        def __init__(self, d_model, n_heads):
            super().__init__()
            self.n_heads = n_heads
            self.ln_attn = nn.LayerNorm(d_model)
            self.qkv = nn.Linear(d_model, 3 * d_model)
            self.attn_out = nn.Linear(d_model, d_model)
            self.ln_mlp = nn.LayerNorm(d_model)
            self.mlp_in = nn.Linear(d_model, 4 * d_model)
            self.mlp_out = nn.Linear(4 * d_model, d_model)

        def forward(self, x):
            b, n, d = x.shape
            h = self.n_heads
            q, k, v = self.qkv(self.ln_attn(x)).split(d, dim=-1)
            q = q.reshape(b, n, h, d // h).transpose(1, 2)
            k = k.reshape(b, n, h, d // h).transpose(1, 2)
            v = v.reshape(b, n, h, d // h).transpose(1, 2)
            y = causal_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
            x = x + self.attn_out(y)
            return x + self.mlp_out(F.gelu(self.mlp_in(self.ln_mlp(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self, d_model, n_layers, n_heads, max_pos):
            super().__init__()
            self.max_pos = max_pos
            self.tok = nn.Embedding(PADDED_VOCAB, d_model)
            self.pos = nn.Embedding(max_pos, d_model)
            self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
            self.ln_final = nn.LayerNorm(d_model)
            self.init_weights(n_layers)

        @torch.no_grad()
        def init_weights(self, n_layers):
            out_std = 0.02 / math.sqrt(2 * n_layers)  # residual-branch output projections, as GPT-2 and muse
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    module.weight.normal_(0.0, 0.02)
                    module.bias.zero_()
            for block in self.blocks:
                block.attn_out.weight.normal_(0.0, out_std)
                block.mlp_out.weight.normal_(0.0, out_std)
            self.tok.weight.normal_(0.0, 0.02)
            self.tok.weight[VOCAB:].zero_()  # padded vocabulary rows
            self.pos.weight.normal_(0.0, 0.01)

        def forward(self, ids):
            n = ids.shape[1]
            positions = torch.arange(n, device=ids.device)
            x = self.tok(ids) + self.pos(positions)
            for block in self.blocks:
                x = block(x)
            return F.linear(self.ln_final(x), self.tok.weight)  # tied head: B×N×Vp logits

    return GPT, has_sdpa


def import_dynamo():
    """torch._dynamo, or None where this torch has no compiler (torch < 2.0)."""
    try:
        import torch._dynamo as dynamo
    except ImportError:
        return None
    return dynamo


def is_oom(torch, exc):
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return "out of memory" in str(exc).lower()


def short_error(exc):
    """The exception's type and first three non-empty lines, on one line."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {' / '.join(lines[:3])}"[:400]


class Runner:
    """One model and its step functions for one size and mode; runs shapes."""

    def __init__(self, torch, args, max_pos):
        self.torch = torch
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.max_pos = max_pos
        GPT, self.has_sdpa = define_model(torch)
        cfg = SIZES[args.size]
        torch.manual_seed(args.seed)
        model = GPT(cfg["d_model"], cfg["n_layers"], cfg["n_heads"], max_pos).to(self.device)
        self.parameters = sum(p.numel() for p in model.parameters())
        self.optimizer_name = None
        if args.mode == "forward":
            model = model.to(dtype=torch.bfloat16)  # resident bf16 inference weights
            model.eval()
        else:
            model.train()  # fp32 master weights; bf16 autocast in the step
            self.optimizer, self.optimizer_name = self.make_optimizer(model)
        self.model = model
        self.compile_error = None
        self.compiled = False
        self.build_step(compile_it=args.compile)

    def make_optimizer(self, model):
        torch = self.torch
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
        kwargs = {"lr": self.args.lr, "betas": (0.9, 0.95), "eps": 1e-8}
        if self.cuda:
            try:
                return torch.optim.AdamW(groups, fused=True, **kwargs), "AdamW(fused)"
            except (TypeError, RuntimeError, ValueError) as exc:
                log(f"fused AdamW unavailable ({short_error(exc)}); using the default implementation")
        return torch.optim.AdamW(groups, **kwargs), "AdamW"

    def build_step(self, compile_it):
        torch = self.torch
        F = torch.nn.functional
        model = self.model
        use_compile = compile_it and hasattr(torch, "compile")
        if compile_it and not use_compile:
            log(f"torch {torch.__version__} has no torch.compile; running eagerly")

        def compile_fn(fn):
            return torch.compile(fn, mode=self.args.compile_mode, dynamic=not self.args.static_shapes)

        if use_compile:
            try:  # e.g. a torch whose compiler does not support this Python refuses here
                compile_fn(lambda x: x)
            except Exception as exc:  # noqa: BLE001
                log(f"torch.compile unavailable ({short_error(exc)}); running eagerly")
                self.compile_error = short_error(exc)
                use_compile = False

        if self.args.mode == "forward":
            fwd = compile_fn(model) if use_compile else model

            def step(ids, targets):
                with torch.no_grad():
                    return fwd(ids)

        else:
            device_type = self.device.type
            params = [p for p in model.parameters()]
            optimizer = self.optimizer

            def loss_fn(ids, targets):
                with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
                    logits = model(ids)
                # Loss over the real vocabulary only (padded columns never reach the softmax), in fp32.
                return F.cross_entropy(logits.flatten(0, 1)[:, :VOCAB].float(), targets.flatten())

            loss_c = compile_fn(loss_fn) if use_compile else loss_fn

            def step(ids, targets):
                loss = loss_c(ids, targets)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                return loss.detach()

        self.step = step
        self.compiled = use_compile

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def cleanup(self):
        if self.args.mode == "train":
            self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def measure(self, batch, seq):
        torch = self.torch
        args = self.args
        gen = torch.Generator(device="cpu")
        gen.manual_seed(args.seed * 1_000_003 + batch * 100_003 + seq)
        ids = torch.randint(0, VOCAB, (batch, seq), generator=gen).to(self.device)
        targets = torch.randint(0, VOCAB, (batch, seq), generator=gen).to(self.device)
        if self.compiled and args.static_shapes:
            import_dynamo().reset()  # one static compilation per shape, no recompile limit
        warmup = max(args.warmup, 1) if self.compiled else args.warmup
        t_warm = time.perf_counter()
        for _ in range(warmup):
            out = self.step(ids, targets)
            self.sync()
            del out
        warm_s = time.perf_counter() - t_warm
        gc.collect()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(args.iters)]
        wall, gpu = [], []
        last = None
        for i in range(args.iters):
            self.sync()
            t0 = time.perf_counter()
            if self.cuda:
                events[i][0].record()
            out = self.step(ids, targets)
            if self.cuda:
                events[i][1].record()
            self.sync()
            wall.append(time.perf_counter() - t0)
            if self.cuda:
                gpu.append(events[i][0].elapsed_time(events[i][1]))
            if args.mode == "train":
                last = out
            del out
        median_s = statistics.median(wall)
        gflop = gflop_per_iter(args.size, batch, seq, args.mode)
        record = {
            "preset": f"peer-gpt-{args.size}",
            "mode": args.mode,
            "batch": batch,
            "seq": seq,
            "device": self.device.type,
            "threads": torch.get_num_threads(),
            "tokens_per_s": batch * seq / median_s,
            "median_ms": median_s * 1e3,
            "peak_mem_mb": torch.cuda.max_memory_allocated(self.device) / 2**20 if self.cuda else None,
            "gflop_per_iter": gflop,
            "gflop_per_s": gflop / median_s,
            "parameters": self.parameters,
            "iters": args.iters,
            "torch": torch.__version__,
            "compiled": self.compiled,
            "min_ms": min(wall) * 1e3,
            "warmup": warmup,
            "warmup_s": round(warm_s, 3),
            "max_pos": self.max_pos,
            "sdpa": self.has_sdpa,
        }
        if self.compiled:
            record["compile_mode"] = args.compile_mode
            record["dynamic"] = not args.static_shapes
        if self.compile_error:
            record["compile_error"] = self.compile_error
        if self.cuda:
            record["median_gpu_ms"] = statistics.median(gpu)
            record["peak_reserved_mb"] = torch.cuda.max_memory_reserved(self.device) / 2**20
            record["gpu"] = torch.cuda.get_device_name(self.device)
        if args.mode == "train":
            record["optimizer"] = self.optimizer_name
            record["loss"] = float(last)  # after the timed loop: no sync inside it
        del ids, targets, last
        return record

    def run_shape(self, batch, seq):
        base = {"preset": f"peer-gpt-{self.args.size}", "mode": self.args.mode, "batch": batch, "seq": seq,
                "device": self.device.type, "torch": self.torch.__version__, "compiled": self.compiled}
        try:
            return self.measure(batch, seq)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a record, the grid goes on
            oom = is_oom(self.torch, exc)
            message = short_error(exc)
        self.cleanup()
        if oom:
            return dict(base, error="oom", message=message)
        if self.compiled:
            # A compiler failure (no C compiler, Triton problem, ...): say so, continue eagerly.
            log(f"torch.compile failed at B={batch} N={seq} ({message}); retrying eagerly, and eager from now on")
            self.compile_error = message
            try:
                import_dynamo().reset()
            except Exception:  # noqa: BLE001 - best effort: eager mode does not need it
                pass
            self.build_step(compile_it=False)
            return self.run_shape(batch, seq)
        return dict(base, error=message)


def main(argv=None):
    args = make_parser().parse_args(argv)
    if (args.batch is None) != (args.seq is None):
        make_parser().error("-b and -n go together")
    if args.batch is not None and args.grid is not None:
        make_parser().error("give either -b/-n or --grid")
    if args.batch is not None:
        if args.batch < 1 or args.seq < 1:
            make_parser().error("-b and -n must be positive")
        shapes = [(args.batch, args.seq)]
    else:
        shapes = args.grid or SPEC_GRID[args.size]
    if args.iters < 1 or args.warmup < 0:
        make_parser().error("--iters must be at least 1 and --warmup at least 0")
    max_n = max(n for _, n in shapes)
    max_pos = args.max_pos if args.max_pos is not None else max(1024, max_n)
    if max_pos < max_n:
        make_parser().error(f"--max-pos {max_pos} is smaller than the largest N ({max_n})")

    try:
        import torch
    except ImportError:
        print("gpt_pytorch.py: PyTorch is not installed (python3 -c 'import torch' fails)", file=sys.stderr)
        return 2
    # torch.cuda's memory and synchronise calls want an indexed device: "cuda" means the current one, 0.
    if args.device == "cuda":
        args.device = "cuda:0"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpt_pytorch.py: --device {args.device} but torch {torch.__version__} sees no CUDA device",
              file=sys.stderr)
        return 2
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(args.seed)
        torch.cuda.set_device(device)
    if hasattr(torch, "set_float32_matmul_precision"):
        torch.set_float32_matmul_precision("high")
    dynamo = import_dynamo()
    if args.compile and dynamo is not None and not args.static_shapes:
        # dynamic=True: B=1 and B>1 compile separately (torch specialises sizes of 1); allow headroom anyway.
        # (With --static-shapes each shape resets dynamo, so the limit never binds.)
        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(dynamo.config, name):
                setattr(dynamo.config, name, max(64, getattr(dynamo.config, name)))

    t_start = time.perf_counter()
    runner = Runner(torch, args, max_pos)
    log(f"{args.size} {args.mode}: {runner.parameters / 1e6:.1f}M parameters, torch {torch.__version__}, "
        f"compile={'on' if runner.compiled else 'off'}, {len(shapes)} shape(s)")
    failures = 0
    for batch, seq in shapes:
        t0 = time.perf_counter()
        record = runner.run_shape(batch, seq)
        print(json.dumps(record), flush=True)
        if "error" in record:
            failures += 1
            log(f"B={batch} N={seq}: {record['error']} ({time.perf_counter() - t0:.1f} s)")
        else:
            log(f"B={batch} N={seq}: {record['tokens_per_s']:,.0f} tokens/s, {record['median_ms']:.2f} ms, "
                f"peak {record['peak_mem_mb'] or 0:,.0f} MiB ({time.perf_counter() - t0:.1f} s)")
    log(f"done in {time.perf_counter() - t_start:.1f} s, {failures} failed shape(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
