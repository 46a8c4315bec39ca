"""Where a training step's time goes: wall time of each phase of llmkit's own step, around the functions it calls.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/phases.py [--skip 5] finetune --model ... --max-steps 80 ...

Runs any llmkit training command (its arguments as on the command line) in this process and prints the median,
25th and 75th percentile and mean milliseconds of: the whole step (train.train_step), the forward pass with the
loss (train.batch_loss, once per micro-batch), the backward pass (Accelerator.backward, once per micro-batch),
clipping with the optimizer step (train.clipped_step), the loop's own work between two steps (logging,
evaluations, checkpoints), and those pauses one by one: an evaluation (train.evaluate_model), a checkpoint
(train._save_checkpoint) and the export of a model (RunDir.export: best/ and the final one). The step's mean is what
throughput sees; the pauses are what the wall time adds. The first `--skip` steps (one-off set-up) are left out.
perf_counter around the calls (on a CPU; a GPU's calls return before its kernels finish), not torch.profiler,
which inflates memory-bound operations on small CPUs. One process: a run of several has children not timed here.
With `--ops N`, every PyTorch operation of the timed steps is timed too (perf_counter around each aten call under a
dispatch mode; a CPU's calls are synchronous) and the N dearest operations are printed in milliseconds per step,
with the time, GFLOP and GFLOP/s of the matrix products (mm, addmm, bmm, baddbmm) and the sum over all operations,
and the same products replayed alone in a tight loop (same shapes, layouts and dtypes; the best of three passes)
beside the 1024^3 product peak measured then: what a step's floor is made of. The dispatch mode adds a few
microseconds per call, so the phases above it read longer than without --ops. Attention through PyTorch's fused
SDPA kernels counts among the other operations, not the products; a compiled model (--compile) shows its compiled
graphs' calls, not these operations.
Not part of `make bench`: it times pieces, not workloads.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils._python_dispatch import TorchDispatchMode

from harness import gemm_peaks

import llmkit.train as train
from llmkit.cli import main as llmkit_main
from llmkit.rundir import RunDir

PAUSES = {"evaluation": (train, "evaluate_model"), "checkpoint": (train, "_save_checkpoint"),
          "export": (RunDir, "export")}
PHASES = {"step": (train, "train_step"), "forward + loss": (train, "batch_loss"),
          "backward": (Accelerator, "backward"), "clip + optimizer": (train, "clipped_step"),
          # the loop's pauses between steps (in "between steps"): an evaluation, a resumable checkpoint, the
          # export of a model (best/ at an evaluation that improves, the final one)
          **PAUSES}


PRODUCTS = {"mm", "addmm", "bmm", "baddbmm"}


class OperationTimer(TorchDispatchMode):
    """Seconds and calls of each aten operation (by name and input dtypes) run under it, and the FLOPs of the
    matrix products among them."""

    def __init__(self):
        super().__init__()
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self.flops = 0.0
        self.products: list[tuple[Any, list[Any], dict]] = []  # (operation, arguments' specs, keyword arguments)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter() - start
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        name = func.overloadpacket.__name__
        key = (name, ",".join(str(t.dtype).removeprefix("torch.") for t in tensors))
        self.seconds[key] += elapsed
        self.calls[key] += 1
        if name in PRODUCTS:  # (batch x) m x k times k x n: 2 m k n per product
            a, b = tensors[-2:]
            self.flops += 2 * a.numel() * b.shape[-1]
            self.products.append((func, [(tuple(x.shape), x.stride(), x.dtype) if isinstance(x, torch.Tensor) else x
                                         for x in args], kwargs or {}))
        return out

    def replay_products(self, passes: int = 3) -> float:
        """Seconds of the best of `passes` runs of every product recorded, one after another, on random inputs of
        the recorded shapes, strides and dtypes (one tensor per distinct layout, reused)."""
        tensors: dict[tuple, torch.Tensor] = {}

        def made(spec):
            if isinstance(spec, tuple) and len(spec) == 3 and isinstance(spec[2], torch.dtype):
                if spec not in tensors:  # strides may repeat elements (0 for an expanded gradient): fill a buffer
                    shape, stride, dtype = spec
                    size = 1 + sum((n - 1) * step for n, step in zip(shape, stride))
                    tensors[spec] = torch.randn(size, dtype=dtype).as_strided(shape, stride)
                return tensors[spec]
            return spec

        calls = [(func, [made(spec) for spec in specs], kwargs) for func, specs, kwargs in self.products]
        best = float("inf")
        for _ in range(passes):
            start = time.perf_counter()
            for func, args, kwargs in calls:
                func(*args, **kwargs)
            best = min(best, time.perf_counter() - start)
        return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     usage="phases.py [--skip N] [--ops N] COMMAND [llmkit's arguments]")
    parser.add_argument("--skip", type=int, default=5, help="first steps left out (default 5)")
    parser.add_argument("--ops", type=int, default=0, metavar="N",
                        help="also time each PyTorch operation of the timed steps and print the N dearest")
    argv, first = sys.argv[1:], 0
    while first < len(argv) and argv[first].startswith("-"):  # this script's options come before the command
        first += 2 if argv[first] in ("--skip", "--ops") else 1
    args = parser.parse_args(argv[:first])
    command = argv[first:]
    seconds: dict[str, list[tuple[float, int]]] = defaultdict(list)  # (seconds, step)
    done = {"steps": 0, "end": None, "in step": False}
    operations = OperationTimer() if args.ops else None

    def timed(name: str, call):
        def wrapper(*a, **k):
            start = time.perf_counter()
            if name == "step":
                done["in step"] = True
                if done["end"] is not None:  # the loop's own work since the last step ended
                    seconds["between steps"].append((start - done["end"], done["steps"]))
            try:
                if name == "step" and operations is not None and done["steps"] >= args.skip:
                    with operations:
                        return call(*a, **k)
                return call(*a, **k)
            finally:
                end = time.perf_counter()
                if name in PAUSES or done["in step"]:  # not an evaluation's forward passes as training's
                    seconds[name].append((end - start, done["steps"]))
                if name == "step":
                    done.update({"steps": done["steps"] + 1, "end": end, "in step": False})
        return wrapper

    for name, (owner, attribute) in PHASES.items():
        setattr(owner, attribute, timed(name, getattr(owner, attribute)))
    try:
        llmkit_main(command)  # as the `llmkit` command runs it: a bad argument is one line and an exit status
    finally:
        if seconds["step"]:
            report(seconds, args.skip)
            if operations is not None:
                report_operations(operations, len([1 for _, step in seconds["step"] if step >= args.skip]), args.ops)
        elif command:  # several processes run in children of their own, which this process does not time
            print("no training step ran in this process: time one process (no --num-processes, no launcher)")


def report(seconds: dict[str, list[tuple[float, int]]], skip: int) -> None:
    print(f"{'phase':18s} {'calls':>6s} {'median ms':>10s} {'p25':>8s} {'p75':>8s} {'mean':>8s} {'total s':>8s}")
    for name in [*PHASES, "between steps"]:
        kept = np.array([s for s, step in seconds[name] if step >= skip]) * 1e3
        if len(kept):
            p25, median, p75 = np.percentile(kept, [25, 50, 75])
            print(f"{name:18s} {len(kept):6d} {median:10.1f} {p25:8.1f} {p75:8.1f} {kept.mean():8.1f} "
                  f"{kept.sum() / 1e3:8.1f}")


def report_operations(operations: OperationTimer, steps: int, top: int) -> None:
    if not steps:
        return
    total = sum(operations.seconds.values())
    products = sum(v for (name, _), v in operations.seconds.items() if name in PRODUCTS)
    print(f"\noperations over {steps} steps, ms per step: all {total / steps * 1e3:.1f}; matrix products "
          f"{products / steps * 1e3:.1f} ({operations.flops / steps / 1e9:.2f} GFLOP, "
          f"{operations.flops / max(products, 1e-9) / 1e9:.0f} GFLOP/s)")
    alone = operations.replay_products()
    peaks = gemm_peaks()
    print(f"the same matrix products replayed alone: {alone / steps * 1e3:.1f} ms per step "
          f"({operations.flops / alone / 1e9:.0f} GFLOP/s); 1024^3 product peak now: fp32 {peaks['fp32']:.0f}, "
          f"bf16 {peaks['bf16']:.0f} GFLOP/s")
    print(f"{'operation':32s} {'dtypes':34s} {'ms/step':>8s} {'calls/step':>10s}")
    for (name, dtypes), value in sorted(operations.seconds.items(), key=lambda item: -item[1])[:top]:
        print(f"{name:32s} {dtypes[:34]:34s} {value / steps * 1e3:8.2f} {operations.calls[name, dtypes] / steps:10.1f}")


if __name__ == "__main__":
    sys.exit(main())
