"""Micro-benchmarks of llmkit's step pieces against what they replace, alternating in one process (medians).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/micro.py [--repeats 30]

- clip + AdamW step over all-MiniLM-L6-v2's 22.7 M parameters (random gradients with a norm above the clip):
  accelerator.clip_grad_norm_ then fused AdamW's step, against llmkit's train.clipped_step;
- dropout forward + backward at shapes of the benchmarks' fine-tuning and CLM steps, fp32 and bf16: PyTorch's
  bool mask (_dropout_keep, then to the dtype and scale), against the numpy factors of tasks._dropout_scale;
- attention without dropout, forward + backward, in training: PyTorch's SDPA against tasks._manual_attention (the
  path of tasks._cpu_training_attention), in bf16 and fp32, at the shapes of the benchmarks' fine-tuning (with a
  padding mask), MLM and CLM steps and at 512 and 1,024 tokens (what tasks.MANUAL_BF16_MAX_LENGTH rests on);
- the attention's softmax, forward + backward, over fine-tuning's short rows and longer ones, bf16 and fp32:
  torch.softmax against tasks._softmax (which computes short rows in fp32, padded to 16 keys below 16) and against
  computing every row in fp32.
Not part of `make bench`: these time pieces, not workloads.
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any, Callable

import torch

from harness import MINILM, alternate, median


def medians_ms(repeats: int, calls: dict[str, Callable[[], Any]],
               prepare: Callable[[str], None] | None = None) -> dict[str, float]:
    """Median milliseconds of each call over `repeats` rounds of harness.alternate, after one warm-up round;
    `prepare(name)` runs before each timed call, outside the timing."""
    def timed(name: str, call: Callable[[], Any]) -> Callable[[int], float]:
        def side(_: int) -> float:
            if prepare is not None:
                prepare(name)
            start = time.perf_counter()
            call()
            return time.perf_counter() - start
        return side

    rounds = alternate(repeats + 1, {name: timed(name, call) for name, call in calls.items()})
    return {name: median(times[1:]) * 1e3 for name, times in rounds.items()}


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

    def set_gradients(name: str) -> None:
        for p, g in zip(models[name].parameters(), grads):
            p.grad = g.clone()

    def accelerate_clip_and_step() -> None:
        m = models["accelerate clip + step"]
        accelerator.clip_grad_norm_(m.parameters(), 1.0)
        optimizers["accelerate clip + step"].step()

    return medians_ms(repeats, {
        "accelerate clip + step": accelerate_clip_and_step,
        "llmkit clipped_step": lambda: clipped_step(accelerator, models["llmkit clipped_step"],
                                                    optimizers["llmkit clipped_step"], 1.0)}, set_gradients)


def dropout(repeats: int) -> dict[str, dict[str, float]]:
    from llmkit.tasks import _dropout_keep, _dropout_scale

    out = {}
    for dtype, shape in ((torch.float32, (32, 15, 384)), (torch.float32, (32, 15, 1536)),
                         (torch.float32, (16, 256, 384)), (torch.float32, (16, 6, 256, 256)),
                         (torch.bfloat16, (16, 256, 384)), (torch.bfloat16, (16, 6, 256, 256))):
        x = torch.randn(shape, dtype=dtype, requires_grad=True)
        g = torch.randn(shape, dtype=dtype)

        def torch_mask():
            (x * (_dropout_keep(x, 0.1).to(x.dtype) * (1 / 0.9))).backward(g)

        def numpy_factors():
            (x * _dropout_scale(x, 0.1, 1 / 0.9)).backward(g)

        name = f"{'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')}"
        out[name] = medians_ms(repeats, {"torch mask": torch_mask, "numpy factors": numpy_factors})
    return out


def attention(repeats: int) -> dict[str, dict[str, float]]:
    from llmkit.tasks import _manual_attention

    module = torch.nn.Module()  # what the attention reads of its layer: causality
    out = {}
    # (batch, heads, length, head size, causal): MiniLM fine-tuning, the MLM and CLM benchmarks' models, longer
    for batch, heads, length, size, causal in ((32, 12, 15, 32, False), (32, 4, 128, 64, False),
                                               (16, 6, 256, 64, True), (8, 12, 512, 64, True), (4, 12, 1024, 64, True)):
        for dtype in (torch.bfloat16, torch.float32):
            torch.manual_seed(0)
            q, k, v = (torch.randn(batch, heads, length, size, dtype=dtype, requires_grad=True) for _ in range(3))
            mask = None
            if not causal and length == 15:  # fine-tuning's padded batch: its last keys are padding
                mask = torch.ones(batch, 1, length, length, dtype=torch.bool)
                mask[::2, :, :, -3:] = False
            grad = torch.randn(batch, length, heads, size, dtype=dtype)
            module.is_causal = causal

            def sdpa():
                torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, is_causal=causal and mask is None).transpose(1, 2).backward(grad)

            def llmkit():
                _manual_attention(module, q, k, v, mask)[0].backward(grad)

            name = f"{batch}x{heads}x{length}{' causal' if causal else ''} {str(dtype).removeprefix('torch.')}"
            out[name] = medians_ms(repeats, {"sdpa": sdpa, "llmkit path": llmkit})
    return out


def softmax(repeats: int) -> dict[str, dict[str, float]]:
    from llmkit.tasks import _softmax

    out = {}
    # fine-tuning's 32 sentences x 12 heads at key lengths its batches have; below 10 bf16 keys (8 fp32) and from 32
    # bf16 keys (16 fp32) on, _softmax is PyTorch's own, and "fp32 pass" shows what a row in fp32 would cost there
    for keys in (4, 8, 12, 15, 24, 40, 72):
        for dtype in (torch.bfloat16, torch.float32):
            torch.manual_seed(0)
            scores = torch.randn(32, 12, keys, keys, dtype=dtype, requires_grad=True)
            grad = torch.randn(32, 12, keys, keys, dtype=dtype)
            name = f"32x12x{keys} {str(dtype).removeprefix('torch.')}"
            out[name] = medians_ms(repeats, {
                "torch.softmax": lambda: torch.softmax(scores, -1).backward(grad),
                "llmkit _softmax": lambda: _softmax(scores).backward(grad),
                "fp32 pass": lambda: torch.softmax(scores, -1, dtype=torch.float32).to(dtype).backward(grad)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    repeats = ap.parse_args().repeats
    print("clip + AdamW step, MiniLM (ms):", {k: round(v, 1) for k, v in clip_and_step(repeats).items()})
    for shape, figures in dropout(repeats).items():
        print(f"dropout fwd+bwd {shape} (ms):", {k: round(v, 3) for k, v in figures.items()})
    for shape, figures in softmax(repeats).items():
        print(f"attention softmax fwd+bwd {shape} (ms):", {k: round(v, 3) for k, v in figures.items()})
    for shape, figures in attention(repeats).items():
        print(f"attention fwd+bwd {shape} (ms):", {k: round(v, 2) for k, v in figures.items()})


if __name__ == "__main__":
    main()
