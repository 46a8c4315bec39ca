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
Not part of `make bench`: it times pieces, not workloads.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict

import numpy as np
from accelerate import Accelerator

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     usage="phases.py [--skip N] COMMAND [llmkit's arguments]")
    parser.add_argument("--skip", type=int, default=5, help="first steps left out (default 5)")
    argv, first = sys.argv[1:], 0
    while first < len(argv) and argv[first].startswith("-"):  # this script's options come before the command
        first += 2 if argv[first] == "--skip" else 1
    args = parser.parse_args(argv[:first])
    command = argv[first:]
    seconds: dict[str, list[tuple[float, int]]] = defaultdict(list)  # (seconds, step)
    done = {"steps": 0, "end": None, "in step": False}

    def timed(name: str, call):
        def wrapper(*a, **k):
            start = time.perf_counter()
            if name == "step":
                done["in step"] = True
                if done["end"] is not None:  # the loop's own work since the last step ended
                    seconds["between steps"].append((start - done["end"], done["steps"]))
            try:
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


if __name__ == "__main__":
    sys.exit(main())
