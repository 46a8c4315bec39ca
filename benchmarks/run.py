"""llmkit against the Hugging Face anchors (../shared/anchors), side by side: one table, one JSON file.

    .venv/bin/python benchmarks/run.py                      # everything (make bench), 30-55 minutes on 2 cores
    .venv/bin/python benchmarks/run.py --only clm,classify  # some of it
    .venv/bin/python benchmarks/run.py --quick              # a check of the harness: tiny runs, figures meaningless

Each benchmark alternates the anchor and llmkit over several rounds and compares medians; see benchmarks/README.md.
Exit status 1 when a benchmark could not run; goals that are not met are results, shown as FAIL (status 0).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback
from pathlib import Path

from rich.markup import escape

import bench_accuracy
import bench_classify
import bench_clm
import bench_finetune
import bench_gpt2
import bench_mlm
import bench_sst2
import bench_tokenize
from harness import RESULTS, Bench, Row, console, print_table, write_json

BENCHMARKS = {"clm": bench_clm, "mlm": bench_mlm, "finetune": bench_finetune, "accuracy": bench_accuracy,
              "tokenize": bench_tokenize, "classify": bench_classify, "sst2": bench_sst2, "gpt2": bench_gpt2}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(BENCHMARKS),
                    help=f"comma-separated benchmarks to run, of: {', '.join(BENCHMARKS)} (default: all)")
    ap.add_argument("--quick", action="store_true",
                    help="very few steps, rows and rounds: checks that the harness runs end to end, in minutes")
    ap.add_argument("--rounds", type=int, default=None,
                    help="anchor/llmkit rounds per benchmark (default: 2 for training, 3 seeds for accuracy, "
                         "3 tokenize, 5 classify; 1 with --quick)")
    ap.add_argument("--output", type=Path, default=RESULTS / "results.json", help="where to write all figures")
    a = ap.parse_args()
    a.only = [name.strip() for name in a.only.split(",") if name.strip()]
    unknown = [name for name in a.only if name not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}: choose from {', '.join(BENCHMARKS)}")
    if a.rounds is not None and a.rounds < 1:
        ap.error("--rounds must be 1 or more")
    return a


def run_one(name: str, quick: bool, rounds: int | None) -> dict:
    module = BENCHMARKS[name]
    bench = Bench(name, quick, rounds or module.default_rounds(quick), cpu_only=getattr(module, "CPU_ONLY", True))
    start, load = time.perf_counter(), os.getloadavg()[0]
    console.rule(f"{name}: {bench.rounds} round(s){' (quick)' if quick else ''}")
    try:
        outcome = module.run(bench)
        rows, figures, error = outcome.rows, outcome.figures, None
    except Exception as e:  # one broken benchmark must not cost the others' figures
        error = "".join(traceback.format_exception(e))
        console.print(f"[red]{name} failed:[/red] {escape(str(e))}")
        rows = [Row(module.WORKLOAD, f"ERROR: {str(e).splitlines()[0]}", None, None, "", passed=False,
                    note=f"all commands' output in {bench.logs}", error=True)]
        figures = {}
    seconds = time.perf_counter() - start
    return {"rows": rows, "figures": figures, "error": error, "rounds": bench.rounds, "seconds": seconds,
            "load_average": {"start": load, "end": os.getloadavg()[0]}}


def main() -> int:
    a = parse_args()
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    results = {name: run_one(name, a.quick, a.rounds) for name in a.only}
    rows = [row for r in results.values() for row in r["rows"]]
    timing = ", ".join(f"{name} {r['seconds'] / 60:.1f} min (load {r['load_average']['start']:.1f})"
                       for name, r in results.items())
    caption = (f"ratio = llmkit / anchor; medians of alternating rounds; MFU against the GEMM peak measured in the "
               f"same run. {timing}. Figures: {a.output}")
    title = "llmkit vs Hugging Face anchors" + (" [QUICK: harness check, figures meaningless]" if a.quick else "")
    print_table(rows, title, caption)
    import torch

    write_json(a.output, {
        "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "quick": a.quick,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine(), "python": sys.version.split()[0]},
        "benchmarks": {name: {**r, "rows": [vars(row) for row in r["rows"]]} for name, r in results.items()}})
    return 1 if any(r["error"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
