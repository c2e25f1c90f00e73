#!/usr/bin/env python3
"""Per-kernel tables (markdown) from the ncu CSVs of scripts/gpu-kernels.sh.

usage: kernel-report.py [--top K] FILE.csv ...

Kernels are grouped by name (template arguments and parameters dropped); each table lists the time per
iteration, its share, and the launch count, largest first, then the total.
"""
import argparse
import collections
import csv
import os
import re
import sys

UNIT_TO_US = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}


def kernel_name(full):
    name = re.sub(r"\(.*", "", full)                     # parameters
    name = name.replace("<unnamed>::", "").replace("(anonymous namespace)::", "")
    name = re.sub(r"^void ", "", name)
    name = re.sub(r"^cutlass::Kernel2<(.*)>$", r"\1", name)  # the kernel's real name is its argument
    name = re.sub(r"\b(muse|detail|cuda|cublasLt|cutlass)::", "", name)
    return name.strip()[:72]


def read(path):
    rows = [r for r in csv.reader(open(path, newline="")) if len(r) > 10]
    if not rows:
        return None
    header = rows[0]
    k, v, u = header.index("Kernel Name"), header.index("Metric Value"), header.index("Metric Unit")
    times = collections.defaultdict(lambda: [0, 0.0])
    for r in rows[1:]:
        us = float(r[v].replace(",", "")) * UNIT_TO_US[r[u]]
        entry = times[kernel_name(r[k])]
        entry[0] += 1
        entry[1] += us
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    for path in args.files:
        times = read(path)
        title = os.path.basename(path).removesuffix(".csv")
        if times is None:
            print(f"### {title}\n\nno kernel records (see the .err file next to it)\n")
            continue
        total = sum(t for _, t in times.values())
        print(f"### {title}\n")
        print("| kernel | ms | share | launches |")
        print("|---|---:|---:|---:|")
        ranked = sorted(times.items(), key=lambda kv: -kv[1][1])
        for name, (count, us) in ranked[: args.top]:
            print(f"| `{name}` | {us / 1e3:.2f} | {100 * us / total:.1f} % | {count} |")
        rest = ranked[args.top:]
        if rest:
            us = sum(t for _, t in (e for _, e in rest))
            print(f"| {len(rest)} other kernels | {us / 1e3:.2f} | {100 * us / total:.1f} % | {sum(c for _, (c, _) in rest)} |")
        print(f"| **total** | **{total / 1e3:.2f}** | | {sum(c for c, _ in times.values())} |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
