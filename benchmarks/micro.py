"""Micro-benchmarks of llmkit's step pieces against what they replace, alternating in one process (medians).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/micro.py [--repeats 30]

- clip + AdamW step over all-MiniLM-L6-v2's 22.7 M parameters (random gradients with a norm above the clip):
  accelerator.clip_grad_norm_ then fused AdamW's step, against llmkit's train.clipped_step;
- dropout forward + backward at shapes of the benchmarks' fine-tuning and CLM steps: PyTorch's bool mask
  (_dropout_keep, then to float and scale), against the numpy factors of tasks._dropout_scale.
Not part of `make bench`: these time pieces, not workloads.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from harness import MINILM


def alternate(repeats: int, sides: dict) -> dict[str, float]:
    """Median milliseconds of each side's call, the sides taking turns."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    for name, fn in sides.items():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in sides.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def clip_and_step(repeats: int) -> dict[str, float]:
    from accelerate import Accelerator
    from transformers import AutoModelForSequenceClassification

    from llmkit.train import clipped_step, make_optimizer

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=2)
    models = {"accelerate clip + step": model, "llmkit clipped_step": copy.deepcopy(model)}
    grads = [torch.randn_like(p) * 0.01 for p in model.parameters()]  # norm ~48: the clip at 1.0 is active
    optimizers = {name: accelerator.prepare(make_optimizer(m, 1e-4, 0.0, (0.9, 0.999))) for name, m in models.items()}

    def side(name: str):
        m, optimizer = models[name], optimizers[name]
        for p, g in zip(m.parameters(), grads):
            p.grad = g.clone()  # before the timed call

        def run():
            if name.startswith("accelerate"):
                accelerator.clip_grad_norm_(m.parameters(), 1.0)
                optimizer.step()
            else:
                clipped_step(accelerator, m, optimizer, 1.0)
        return run

    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats + 1):
        for name in models:
            run = side(name)
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t[1:]) * 1e3 for name, t in times.items()}


def dropout(repeats: int) -> dict[str, dict[str, float]]:
    from llmkit.tasks import _dropout_keep, _dropout_scale

    out = {}
    for shape in ((32, 15, 384), (32, 15, 1536), (16, 256, 384), (16, 6, 256, 256)):
        x = torch.randn(shape, requires_grad=True)
        g = torch.randn(shape)

        def torch_mask():
            (x * (_dropout_keep(x, 0.1).to(x.dtype) * (1 / 0.9))).backward(g)

        def numpy_factors():
            (x * _dropout_scale(x, 0.1, 1 / 0.9)).backward(g)

        out["x".join(map(str, shape))] = alternate(repeats, {"torch mask": torch_mask, "numpy factors": numpy_factors})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    repeats = ap.parse_args().repeats
    print("clip + AdamW step, MiniLM (ms):", {k: round(v, 1) for k, v in clip_and_step(repeats).items()})
    for shape, figures in dropout(repeats).items():
        print(f"dropout fwd+bwd {shape} (ms):", {k: round(v, 3) for k, v in figures.items()})


if __name__ == "__main__":
    main()
