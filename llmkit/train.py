"""The one training loop, shared by pretrain and finetune, on Accelerate.

    setup (precision, batch arithmetic, optimizer, schedule) -> resume? -> for each step:
        fetch this process's micro-batches -> count the items of the global batch ->
        forward/backward each micro-batch (loss sum / global item count) -> clip -> step ->
        log / evaluate / checkpoint

Batch arithmetic: global batch = micro batch x accumulation x processes; the user sets the global batch and
the accumulation follows. Data order comes from `StepSampler`, a function of (seed, step) only, so a resumed
run or a run on another number of processes sees exactly the same examples at every step.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from llmkit import checkpoint as ckpt
from llmkit import display
from llmkit.errors import LlmkitError, UsageError
from llmkit.evaluation import evaluate_model
from llmkit.rundir import RunDir
from llmkit.tasks import (Masking, batch_loss, compile_for_training, use_fast_attention, use_fast_dropout,
                          use_fast_gelu)


class Interrupted(LlmkitError):
    exit_code = 130


@dataclass
class TrainJob:
    """Everything the loop needs; built by `pretrain` and `finetune`."""

    cfg: Any  # PretrainConfig or FinetuneConfig
    objective: str  # clm, mlm or classification
    model: torch.nn.Module
    tokenizer: Any
    train_data: Any  # PackedBlocks or LabeledExamples
    eval_data: Any | None
    default_learning_rate: float
    default_global_batch: int
    metric: str = "loss"  # what picks the best model: loss (lower is better) or a classification metric
    masking: Masking | None = None
    class_weights: torch.Tensor | None = None
    multi_label: bool = False
    threshold: float | list[float] | str = 0.5  # multi-label: for all labels, per label, or "auto" (see evaluation)
    label_names: list[str] | None = None
    tokens_per_example: int | None = None  # block size for language models
    record: dict[str, Any] = field(default_factory=dict)  # what the run directory's llmkit_run.json says


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto = bf16 where the hardware runs it fast: CUDA GPUs with bf16, CPUs whose bf16 matrix products are
    measurably faster than fp32 ones (see cpu_bf16_speedup); else fp32 (fp16 on GPUs without bf16)."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise UsageError("--precision fp16 needs a GPU: use bf16 (fast on CPUs with AMX) or fp32")
    if precision == "bf16" and device.type == "cpu" and cpu_bf16_speedup() == 0:
        display.info("[yellow]--precision bf16: this CPU has no bf16 instructions (AVX-512 BF16 or AMX), so its bf16 "
                     "matrix products run emulated, a hundred times slower than fp32 ones or more (0.7 against 146 "
                     "GFLOP/s on a Zen 2 VM); --precision auto picks fp32 here[/yellow]")
    return precision


# bf16 autocast pays for its casts only when its matrix products are clearly faster than fp32's
FAST_BF16_SPEEDUP = 1.3
# The launching process's measurement, handed to the ranks of a job it starts so that they all agree
BF16_SPEEDUP_ENV = "LLMKIT_CPU_BF16_SPEEDUP"


def cpu_has_fast_bf16() -> bool:
    return cpu_bf16_speedup() >= FAST_BF16_SPEEDUP


@functools.lru_cache(maxsize=None)
def cpu_bf16_speedup() -> float:
    """How many times faster a bf16 matrix product runs than an fp32 one on this CPU: fp32 time / bf16 time of a
    512 x 512 x 512 product on one thread, the best of ten each, interleaved (once per process: ~0.1 s in a fresh
    process, where the first bf16 product also creates oneDNN's kernel); 0 without bf16 instructions. The
    instruction flags alone do not tell: AMX runs bf16 products several times faster than fp32 (2 cores: ~400-870
    vs ~190-300 GFLOP/s), while AVX-512 BF16 alone may run them at half fp32's speed (an Emerald Rapids VM without
    AMX: 150-170 vs 260-320 GFLOP/s). The ranks of a launched job take the launching process's figure
    (BF16_SPEEDUP_ENV)."""
    try:
        return float(os.environ[BF16_SPEEDUP_ENV])
    except (KeyError, ValueError):  # not launched by llmkit (or a value that is no number): measure
        pass
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: ask PyTorch what the CPU has
        flags = " avx512_bf16" if torch.cpu._is_avx512_bf16_supported() else ""
    if " avx512_bf16" not in flags and " amx_bf16" not in flags:
        return 0.0
    full = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))  # the global generator stays as seeded
    pairs = {dtype: (full.to(dtype), full.to(dtype).T.contiguous()) for dtype in (torch.float32, torch.bfloat16)}
    # on one thread: with other work on the cores, a multi-threaded product waits for its slowest thread, and the
    # two dtypes' libraries (MKL, oneDNN) suffer unequally (2 cores with a test suite running beside: 0.27-3.6 on
    # two threads, 0.54-0.59 on one; 0.53-0.64 on two threads of the quiet machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for a, b in pairs.values():  # the first product creates the kernel
            torch.mm(a, b)
        best = dict.fromkeys(pairs, math.inf)
        for _ in range(10):  # the best of several short runs: another process spoils some, rarely all
            for dtype, (a, b) in pairs.items():
                start = time.perf_counter()
                torch.mm(a, b)
                best[dtype] = min(best[dtype], time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return best[torch.float32] / best[torch.bfloat16]


def make_accelerator(precision: str, report_to: list[str] | None = None, project_dir: str | None = None):
    from accelerate import Accelerator

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = resolve_precision(precision, device)
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[resolved]
    from accelerate.state import AcceleratorState

    # Accelerate keeps one state per process; the Python API may run several commands with different
    # precisions in one process, so a state of another precision is dropped (the process group is kept).
    if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_mixed_precision") != mixed:
        AcceleratorState._reset_state()
    check_trackers(report_to or [])
    from accelerate.utils import ProjectConfiguration

    project = ProjectConfiguration(project_dir=project_dir, logging_dir=str(Path(project_dir) / "tensorboard")) \
        if project_dir else None
    accelerator = Accelerator(mixed_precision=mixed, log_with=report_to or None, project_config=project,
                              cpu=device.type == "cpu")
    if device.type == "cpu":
        keep_freed_memory()
    return accelerator, resolved


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the system (commands that
    run a model on a CPU: training and evaluate). By default it serves each block over 32 MB (a step's logits,
    attention scores, gradient buffers) with a fresh mmap and unmaps it on free, so the next step faults every
    page in again: a cast of 4,080 x 8,192 bf16 logits to fp32 takes 40-49 ms that way and 7-9 ms from reused
    memory (2-core CPU). The process then stays at its peak memory, as under jemalloc or tcmalloc. Returns
    whether the setting was made (glibc only)."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    m_trim_threshold, m_mmap_threshold, m_mmap_max = -1, -3, -4  # malloc.h
    # a threshold above 32 MB is refused by older glibc releases: there, no mmapped blocks at all
    mmap_off = libc.mallopt(m_mmap_threshold, 1 << 30) or libc.mallopt(m_mmap_max, 0)
    trim_off = libc.mallopt(m_trim_threshold, (1 << 31) - 1)
    return bool(mmap_off and trim_off)


def check_trackers(report_to: list[str]) -> None:
    """Accelerate silently drops a tracker whose package is missing: a run asked to log somewhere must say so."""
    import importlib.util

    packages = {"tensorboard": "tensorboard", "wandb": "wandb"}
    missing = [name for name in report_to if importlib.util.find_spec(packages.get(name, name)) is None]
    if missing:
        raise UsageError(f"--report-to {', '.join(missing)}: the package is not installed; pip install "
                         f"{' '.join(packages[m] for m in missing)} (or drop --report-to)")


def lr_lambda(warmup: int, total: int, schedule: str, min_ratio: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * decay
    return factor


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]):
    """AdamW; weight decay on matrices only (biases and norm gains are not decayed), fused where available."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas)


def model_signature(model: torch.nn.Module) -> str:
    """Names and shapes of all parameters: equal exactly when a checkpoint fits the model."""
    import hashlib

    text = ";".join(f"{n}:{tuple(p.shape)}" for n, p in model.state_dict().items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Plan:
    global_batch: int
    micro_batch: int
    accumulation: int
    processes: int
    steps: int
    warmup: int
    learning_rate: float
    steps_per_epoch: int
    eval_every: int
    save_every: int
    precision: str

    def tokens_per_step(self, tokens_per_example: int | None) -> int | None:
        return self.global_batch * tokens_per_example if tokens_per_example else None


def make_plan(job: TrainJob, processes: int, precision: str) -> Plan:
    cfg = job.cfg
    n = len(job.train_data)
    global_batch = cfg.global_batch_size or job.default_global_batch
    tokens_per_step = getattr(cfg, "tokens_per_step", None)
    if tokens_per_step:
        global_batch = max(1, tokens_per_step // job.tokens_per_example)
    global_batch = min(global_batch, n) if not cfg.global_batch_size and not tokens_per_step else global_batch
    if global_batch % processes:
        raise UsageError(f"the global batch of {global_batch} does not split over {processes} processes: use a "
                         f"multiple of {processes}")
    per_process = global_batch // processes
    micro = min(cfg.micro_batch_size or per_process, per_process)
    if per_process % micro:
        raise UsageError(f"--micro-batch-size {micro} does not divide the {per_process} examples each process "
                         f"takes per step (global batch {global_batch} / {processes} processes): pick a divisor")
    if n < global_batch:
        raise LlmkitError(f"the training data has {n} examples ({'blocks' if job.tokens_per_example else 'rows'}), "
                          f"fewer than one global batch of {global_batch}: give more data or a smaller "
                          "--global-batch-size" + (" or --block-size" if job.tokens_per_example else ""))
    steps_per_epoch = n // global_batch
    limits = []
    if cfg.max_steps:
        limits.append(cfg.max_steps)
    max_tokens = getattr(cfg, "max_tokens", None)  # pretraining only
    if max_tokens and job.tokens_per_example:
        limits.append(max(1, math.ceil(max_tokens / (global_batch * job.tokens_per_example))))
    if cfg.epochs:
        limits.append(max(1, math.ceil(cfg.epochs * steps_per_epoch)))
    steps = min(limits) if limits else steps_per_epoch
    if cfg.warmup_steps is None:
        warmup = min(1000, math.ceil(0.06 * steps))
    elif cfg.warmup_steps < 1:
        warmup = math.ceil(cfg.warmup_steps * steps)
    else:
        warmup = int(cfg.warmup_steps)
    tenth = max(1, math.ceil(steps / 10))
    eval_every = cfg.eval_every or max(1, math.ceil(steps / default_evaluations(job, steps, global_batch, micro,
                                                                                 processes)))
    # checkpoints at each --eval-every, else about ten a run: fewer evaluations by default are no reason to risk
    # more of a run on a crash
    save_every = cfg.save_every or cfg.eval_every or tenth
    return Plan(global_batch=global_batch, micro_batch=micro, accumulation=per_process // micro,
                processes=processes, steps=steps, warmup=warmup,
                learning_rate=cfg.learning_rate or job.default_learning_rate, steps_per_epoch=steps_per_epoch,
                eval_every=eval_every, save_every=save_every, precision=precision)


EVALUATION_SHARE = 0.2  # without --eval-every, evaluations take at most about this share of the training's compute


def eval_batch_size(micro_batch: int) -> int:
    """The batch size of evaluations during training: the micro-batch, at least 8."""
    return max(micro_batch, 8)


def default_evaluations(job: TrainJob, steps: int, global_batch: int, micro: int, processes: int) -> int:
    """How many evaluations a run makes without --eval-every: 10, or fewer where the evaluation data is large beside
    the training, so that the evaluations, the last one (always over the whole set) included, take no more than
    EVALUATION_SHARE of the training's compute, or just the last one where that alone takes more (SST-2's 872 dev
    sentences against 2,000 training rows). An evaluated token costs a third of a trained one (a forward pass, no
    backward); with --eval-batches the others score a sample. --patience counts evaluations: 10 then."""
    if job.eval_data is None or getattr(job.cfg, "patience", None) is not None:
        return 10

    def mean_length(data) -> float:  # packed blocks have no lengths: each is a block
        lengths = data.lengths()
        return float(np.mean(lengths)) if lengths is not None and len(lengths) else job.tokens_per_example or 1.0

    training = 3 * steps * global_batch * mean_length(job.train_data)  # in evaluated tokens' cost
    per_example = mean_length(job.eval_data) / training
    full = len(job.eval_data) * per_example
    eval_batches = getattr(job.cfg, "eval_batches", None)
    sample = min(full, eval_batches * eval_batch_size(micro) * processes * per_example) if eval_batches else full
    return min(10, 1 + math.floor(max(0.0, EVALUATION_SHARE - full) / max(sample, 1e-12) + 1e-9))


def better(metric: str, new: float, old: float | None) -> bool:
    if old is None:
        return True
    return new < old if metric == "loss" else new > old


def fit(job: TrainJob) -> dict[str, Any]:
    """Train `job.model` and write the run directory; returns the final metrics."""
    cfg = job.cfg
    accelerator, precision = make_accelerator(cfg.precision, cfg.report_to, cfg.output)
    rank, world = accelerator.process_index, accelerator.num_processes
    plan = make_plan(job, world, precision)
    base_model = job.model
    if cfg.gradient_checkpointing:
        # transformers 5 renamed it; older releases only have the first name
        enable = getattr(base_model, "activation_checkpointing_enable", None) or \
            base_model.gradient_checkpointing_enable
        enable()
    base_model.to(accelerator.device)
    if accelerator.device.type == "cpu":
        use_fast_dropout(base_model)
        use_fast_gelu(base_model)
        use_fast_attention(base_model)
    optimizer = make_optimizer(base_model, plan.learning_rate, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(plan.warmup, plan.steps, cfg.lr_schedule, cfg.min_lr_ratio))
    signature = model_signature(base_model)
    from llmkit.data import StepSampler

    sampler = StepSampler(len(job.train_data), plan.global_batch, cfg.seed, lengths=job.train_data.lengths())
    if cfg.dry_run:
        return dry_run(job, plan, accelerator, base_model, optimizer, scheduler, sampler)
    run = RunDir(Path(cfg.output), main=writes_output(accelerator, Path(cfg.output)))
    run.claim()  # lock an existing --output and repair what a crash left there before a checkpoint is picked
    handlers = None
    try:  # whatever fails from here on, the lock is released (the Python API may run again in this process)
        accelerator.wait_for_everyone()

        start_step = 0
        state = {"best": None, "best_step": None, "bad_evals": 0, "tokens": 0, "train_loss": float("nan"),
                 "eval": {}}
        resume_from = None
        if cfg.resume:
            resume_from = ckpt.find_resume_checkpoint(cfg.resume, run.path,
                                                      earlier_run=run.read_record() is not None)
            loaded = ckpt.load_training_state(resume_from, base_model, optimizer, scheduler, rank, signature,
                                              scaler=accelerator.scaler)
            if loaded["processes"] != world or loaded["global_batch"] != plan.global_batch:
                raise UsageError(f"checkpoint {resume_from} was written by a run with {loaded['processes']} "
                                 f"processes and global batch {loaded['global_batch']}: resume with the same (now "
                                 f"{world} and {plan.global_batch})")
            start_step = loaded["step"]
            state.update({k: loaded.get(k, v) for k, v in state.items()})
        run.start(resume=bool(cfg.resume), overwrite=cfg.overwrite,
                  keep_metrics_until=start_step if cfg.resume else None)
        if cfg.compile:
            compile_for_training(base_model, job.objective)
        model, optimizer = accelerator.prepare(base_model, optimizer)
        if cfg.report_to:
            accelerator.init_trackers("llmkit", config={k: v for k, v in vars(cfg).items()
                                                        if isinstance(v, (int, float, str, bool))})
        params = sum(p.numel() for p in base_model.parameters())
        display.info(f"[bold]{job.objective}[/bold] {type(base_model).__name__}, {params / 1e6:.2f}M parameters; "
                     f"{len(job.train_data)} training {'blocks' if job.tokens_per_example else 'examples'}; "
                     f"{plan.steps} steps of {plan.global_batch} ({plan.processes} process(es) x "
                     f"{plan.accumulation} accumulation x micro-batch {plan.micro_batch}); "
                     f"lr {plan.learning_rate:g}, warm-up {plan.warmup}; {accelerator.device.type} {precision}"
                     + ("" if job.eval_data is None else "; evaluates once, at the end" if plan.eval_every >= plan.steps
                        else f"; evaluates every {plan.eval_every} steps"))
        if resume_from is not None:
            display.info(f"resuming from {resume_from} at step {start_step}")
        job.record.update(parameters=params, plan=vars(plan))

        stop = {"signal": None}
        handlers = _install_signal_handlers(stop)
        return _loop(job, plan, accelerator, model, base_model, optimizer, scheduler, sampler, run, state,
                     start_step, signature, stop)
    finally:
        if handlers is not None:
            _restore_signal_handlers(handlers)
        if cfg.report_to:
            accelerator.end_training()
        run.release()


def estimate(job: TrainJob, plan: Plan, model: torch.nn.Module) -> dict[str, Any]:
    """FLOPs and memory of the planned run, from the model's shape (estimates, not measurements)."""
    config = model.config
    params = sum(p.numel() for p in model.parameters())
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    if job.tokens_per_example:
        length = job.tokens_per_example
    else:
        length = float(np.mean(job.train_data.lengths()))
    tokens = plan.steps * plan.global_batch * length
    flops_per_token = 6 * params + 12 * layers * hidden * length  # weights + attention scores (PaLM appendix B)
    state_bytes = params * (4 + 4 + 8)  # fp32 weights, gradients, AdamW's two moments
    b, s = plan.micro_batch, length
    activation_bytes = layers * (34 * s * b * hidden + 5 * heads * s * s * b)  # Korthikanti et al. 2022, 16-bit
    logits_bytes = 3 * 4 * b * s * getattr(config, "vocab_size", 0) if job.objective == "clm" else 0
    return {"parameters": params, "steps": plan.steps, "examples_per_step": plan.global_batch,
            "tokens_per_step": int(plan.global_batch * length), "training_tokens": int(tokens),
            "total_flops": float(flops_per_token * tokens),
            "memory_gb_estimate": round((state_bytes + activation_bytes + logits_bytes) / 1e9, 3),
            "precision": plan.precision, "processes": plan.processes, "accumulation": plan.accumulation,
            "micro_batch": plan.micro_batch, "learning_rate": plan.learning_rate, "warmup_steps": plan.warmup}


def dry_run(job: TrainJob, plan: Plan, accelerator, model, optimizer, scheduler, sampler,
            measured_steps: int = 3) -> dict[str, Any]:
    """The plan before spending hours: sizes, FLOPs, memory, and a time estimate from a few real steps.
    Nothing is written; the steps run on a model that is thrown away."""
    summary = estimate(job, plan, model)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    prepared.train()
    steps = min(measured_steps + 1, plan.steps)
    started = None
    for step in range(steps):
        if step == 1:  # the first step pays for one-off set-up: leave it out
            started = time.perf_counter()
        loss_sum, _, _ = train_step(job, plan, accelerator, prepared, optimizer, scheduler, sampler, step)
        loss_sum.item()
    if started is not None:
        per_step = (time.perf_counter() - started) / (steps - 1)
        summary.update(seconds_per_step=round(per_step, 4), estimated_hours=round(per_step * plan.steps / 3600, 3),
                       tokens_per_second=round(summary["tokens_per_step"] / per_step))
    return summary


def train_step(job: TrainJob, plan: Plan, accelerator, model, optimizer, scheduler, sampler, step: int):
    """One optimizer step over this process's micro-batches; returns (loss sum, global item count, tokens seen
    by all processes) as tensors/ints, without waiting for the device."""
    cfg = job.cfg
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    micro = sampler.micro_batches(step, rank, world, plan.micro_batch)
    epoch = step // plan.steps_per_epoch
    batches = [job.train_data.batch(idx) for idx in micro]
    if job.masking is not None:
        for idx, batch in zip(micro, batches):
            batch["masked_ids"], batch["mlm_labels"] = job.masking.rows(batch["input_ids"], idx,
                                                                        cfg.seed * 1_000_003 + epoch)
    items = _count_items(job, batches, device)
    tokens = world * sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                         for b in batches)
    batches = [_to_device(b, device) for b in batches]
    if world > 1:
        items = accelerator.reduce(items, reduction="sum")
    loss_total = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        sync = contextlib.nullcontext() if i == len(batches) - 1 else accelerator.no_sync(model)
        with sync, accelerator.autocast():
            loss_sum, _, _ = batch_loss(job.objective, model, batch, class_weights=job.class_weights,
                                        multi_label=job.multi_label)
            loss = loss_sum * world / items
        accelerator.backward(loss)
        loss_total += loss_sum.detach()
    clipped_step(accelerator, model, optimizer, cfg.max_grad_norm)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_total, items, tokens


def clipped_step(accelerator, model, optimizer, max_norm: float) -> None:
    """Clip the gradients to a global L2 norm of `max_norm` (none for 0), as accelerator.clip_grad_norm_ does, and
    take the optimizer step. Where each process holds whole fp32 gradients (one process or DDP) and the optimizer is
    torch's fused AdamW with no loss scaler, the norm is (on a CPU) a sum of dot products, 2-3x faster than torch's
    per-tensor norms there, and the clip factor rides in the optimizer's own pass over the gradients, as the divisor
    `grad_scale` that GradScaler hands fused optimizers, instead of a pass of its own: ~11 ms of a ~230 ms MiniLM
    fine-tuning step here. The update is the same up to rounding (the norm summed in another order, a division
    by 1/c for a multiplication by c). The param groups decide fused or not (a resumed state brings its own)."""
    from accelerate.utils import DistributedType

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds torch's optimizer
    grads = [p.grad for p in model.parameters() if p.grad is not None] if max_norm > 0 else []
    fused = (grads and accelerator.scaler is None and all(g.get("fused") for g in inner.param_groups)
             and getattr(inner, "_step_supports_amp_scaling", False) and not hasattr(inner, "grad_scale")
             and accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU,
                                                  DistributedType.MULTI_GPU)
             and all(type(g) is torch.Tensor and g.dtype == torch.float32 and g.device == grads[0].device
                     for g in grads))
    if not fused:
        if max_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        return
    if grads[0].device.type == "cpu":
        norm = torch.stack([torch.dot(g.reshape(-1), g.reshape(-1)) for g in grads]).sum().sqrt()
    elif hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: foreach kernels, not a launch per tensor
        norm = torch.nn.utils.get_total_norm(grads)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    inner.grad_scale = ((norm + 1e-6) / max_norm).clamp(min=1.0)  # 1 / clip_grad_norm_'s clip coefficient
    try:
        optimizer.step()
    finally:
        del inner.grad_scale


def _loop(job, plan, accelerator, model, base_model, optimizer, scheduler, sampler, run, state, start_step,
          signature, stop) -> dict[str, Any]:
    cfg = job.cfg
    world = accelerator.num_processes
    device = accelerator.device
    loss_total = torch.zeros((), device=device)
    items_total = torch.zeros((), device=device)
    first_bad = torch.zeros((), dtype=torch.long, device=device)  # the first step whose loss was not finite, or 0
    window_start, window_step, window_tokens = time.perf_counter(), start_step, 0
    eval_metrics: dict[str, Any] = dict(state.get("eval") or {})  # a run resumed at its last step has no more
    train_loss = state.get("train_loss", float("nan"))
    step = start_step
    weights_checked = None  # the step whose weights _check_finite last saw (they do not change until the next)
    model.train()
    with display.StepProgress("train", plan.steps) as progress:
        progress.update(step)
        while step < plan.steps:
            loss_sum, items, tokens = train_step(job, plan, accelerator, model, optimizer, scheduler, sampler, step)
            loss_total += loss_sum
            items_total += items
            window_tokens += tokens
            step += 1
            first_bad += ((first_bad == 0) & ~torch.isfinite(loss_sum)) * step  # on the device: no wait per step
            state["tokens"] += plan.global_batch * (job.tokens_per_example or 0)

            last = step == plan.steps
            stopping = _agreed_signal(stop, accelerator)
            if step % cfg.log_every == 0 or last or stopping:
                _check_finite(accelerator, run, first_bad, step)
                if world > 1:
                    loss_total = accelerator.reduce(loss_total, reduction="sum")
                train_loss = (loss_total / items_total.clamp(min=1)).item()
                state["train_loss"] = train_loss
                seconds = time.perf_counter() - window_start
                figures = {"loss": train_loss, "lr": scheduler.get_last_lr()[0],
                           "tok/s": window_tokens / max(seconds, 1e-9)}
                if not job.tokens_per_example:
                    figures["samples/s"] = (step - window_step) * plan.global_batch / max(seconds, 1e-9)
                record = {"step": step, "epoch": round(step / plan.steps_per_epoch, 4), "loss": train_loss,
                          "learning_rate": figures["lr"], "tokens_per_second": figures["tok/s"],
                          "tokens": state["tokens"]}
                if "samples/s" in figures:
                    record["samples_per_second"] = figures["samples/s"]
                run.log(record)
                if cfg.report_to:
                    accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)
                progress.update(step, log=True, **figures)
                loss_total.zero_()
                items_total.zero_()
                window_start, window_step, window_tokens = time.perf_counter(), step, 0

            evaluating = job.eval_data is not None and (step % plan.eval_every == 0 or last)
            if evaluating or step % plan.save_every == 0 or stopping:
                # no best/ export and no save of a diverged model (--resume auto trusts a save); its host sync also
                # keeps queued training work out of the pause timed below. An evaluation leaves the weights as
                # they are, so a save that the evaluation decides on (patience) is covered too.
                _check_finite(accelerator, run, first_bad, step, model=base_model)
                weights_checked = step
            paused = time.perf_counter()  # evaluations and saves stay out of the training throughput
            if evaluating:
                eval_metrics = evaluate_model(job.objective, model, job.eval_data, accelerator,
                                              batch_size=eval_batch_size(plan.micro_batch), seed=cfg.seed,
                                              masking=job.masking, max_batches=None if last else cfg.eval_batches,
                                              multi_label=job.multi_label, threshold=job.threshold,
                                              label_names=job.label_names)
                if "thresholds" in eval_metrics:  # multi-label: export the model with the thresholds just used
                    base_model.config.llmkit_thresholds = eval_metrics["thresholds"]
                model.train()
                state["eval"] = {k: v for k, v in eval_metrics.items() if isinstance(v, (int, float))}
                run.log({"step": step, **{f"eval_{k}": v for k, v in eval_metrics.items()
                                          if isinstance(v, (int, float))}})
                if cfg.report_to:
                    accelerator.log({f"eval/{k}": v for k, v in eval_metrics.items() if isinstance(v, (int, float))},
                                    step=step)
                progress.update(step, log=True, **{f"eval_{job.metric}": eval_metrics[job.metric]})
                if better(job.metric, eval_metrics[job.metric], state["best"]):
                    state.update(best=eval_metrics[job.metric], best_step=step, bad_evals=0)
                    if run.main:
                        run.export(base_model, job.tokenizer, run.path / "best",
                                   {**job.record, "step": step, "metrics": eval_metrics})
                else:
                    state["bad_evals"] += 1

            patience = getattr(cfg, "patience", None)
            out_of_patience = patience is not None and state["bad_evals"] >= patience
            if step % plan.save_every == 0 or stopping or (out_of_patience and not last):
                _save_checkpoint(accelerator, run, base_model, optimizer, scheduler, step, plan, state, signature,
                                 cfg.keep_checkpoints)
            window_start += time.perf_counter() - paused
            if stopping and not last:
                raise Interrupted(f"stopped by {stopping} at step {step}; checkpoint saved: continue with the "
                                  f"same command and --resume auto")
            if out_of_patience and not last:
                display.info(f"early stop at step {step}: {job.metric} has not improved for {patience} evaluations "
                             f"(best {state['best']:.4g} at step {state['best_step']})")
                break

    final = {"step": step, "train_loss": train_loss, **{f"eval_{k}": v for k, v in eval_metrics.items()}}
    if state["best"] is not None:
        final.update(best_step=state["best_step"], **{f"best_{job.metric}": state["best"]})
    if weights_checked != step:  # the loop ended without an evaluation or save at its last step (or never ran)
        _check_finite(accelerator, run, first_bad, step, model=base_model)
    digests = [weights_digest(base_model)]
    if world > 1:  # data parallelism must leave every process with the same weights: check it
        from accelerate.utils import gather_object

        digests = gather_object(digests)
        if len(set(digests)) > 1:
            short = ", ".join(d[:8] for d in digests)
            raise LlmkitError(f"the {world} processes ended with different weights ({short})"
                              ": please report this with `llmkit env` and the command")
    if run.main:
        run.export(base_model, job.tokenizer, run.path, {**job.record, "step": step, "metrics": final,
                                                         "weights_sha256_by_rank": digests}, final=True)
        from llmkit.plot import save_curves

        try:
            save_curves([run.path], run.path / "curves.png")
        except Exception as e:  # a picture must not fail a finished run: say so and go on
            display.info(f"[yellow]could not draw {run.path / 'curves.png'}: {e}[/yellow]")
    accelerator.wait_for_everyone()
    return final


def writes_output(accelerator, output: Path) -> bool:
    """Whether this process writes the run directory: the main process, and on a machine that does not share
    the main process's --output (no shared file system), that machine's local main process too - so that every
    machine ends with the model and can resume from its own checkpoints."""
    if accelerator.num_processes == 1:
        return True
    import secrets

    from accelerate.utils import broadcast_object_list

    token = [secrets.token_hex(8) if accelerator.is_main_process else None]
    marker = output / f".llmkit-shared-{token[0]}" if accelerator.is_main_process else None
    if marker is not None:
        output.mkdir(parents=True, exist_ok=True)
        marker.touch()
    broadcast_object_list(token)
    shared = (output / f".llmkit-shared-{token[0]}").exists()
    accelerator.wait_for_everyone()
    if marker is not None:
        marker.unlink()
    return accelerator.is_main_process or (accelerator.is_local_main_process and not shared)


def weights_digest(model: torch.nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _count_items(job: TrainJob, batches: list[dict], device) -> torch.Tensor:
    if job.objective == "clm":
        n = sum(b["input_ids"][:, 1:].numel() for b in batches)
    elif job.objective == "mlm":
        n = sum(int((b["mlm_labels"] != -100).sum()) for b in batches)
    else:
        n = sum(b["labels"].numel() for b in batches)
    return torch.tensor(float(max(n, 1)), device=device)


def _to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _check_finite(accelerator, run: RunDir, first_bad: torch.Tensor, step: int, model=None) -> None:
    """Stop before a diverged state is logged, exported or saved: raise if the loss of any step so far, on any
    process, was not finite (`first_bad` names the first such step), or - given `model` - if its weights are
    not. One host sync, so only at log, evaluation and save steps."""
    flags = first_bad.reshape(1)
    if model is not None:
        finite = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()
        flags = torch.cat([flags, (~finite).long().reshape(1)])
    flags = accelerator.gather(flags.reshape(1, -1)).cpu()  # one row per process
    bad_steps = flags[:, 0][flags[:, 0] > 0]
    if bad_steps.numel():
        what = f"the loss became nan or inf at step {int(bad_steps.min())}"
    elif model is not None and flags[:, 1].any():
        what = f"the weights became nan or inf by step {step}"
    else:
        return
    kept = ckpt.checkpoint_dirs(run.path)
    where = f"; the last good checkpoint is {kept[-1]}" if kept else ""
    raise LlmkitError(f"{what}: lower --learning-rate, or train in --precision fp32{where}")


def _save_checkpoint(accelerator, run: RunDir, model, optimizer, scheduler, step: int, plan: Plan, state: dict,
                     signature: str, keep: int) -> None:
    directory = run.path / "checkpoints" / f"step-{step:08d}"
    tmp = ckpt.temporary_sibling(directory, create=run.main)
    accelerator.wait_for_everyone()
    try:
        ckpt.save_rng(tmp, accelerator.process_index)  # every process has its own RNG streams
        accelerator.wait_for_everyone()
        if run.main:
            training_state = {"step": step, "processes": plan.processes, "global_batch": plan.global_batch,
                              "model_signature": signature, **state}
            ckpt.save_training_state(tmp, model, optimizer, scheduler, training_state, scaler=accelerator.scaler)
            ckpt.commit(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a disk that filled up leaves no half-written checkpoint
        raise
    if run.main:
        ckpt.prune(run.path, keep)
    accelerator.wait_for_everyone()


def _install_signal_handlers(stop: dict) -> dict:
    def handler(signum, frame):
        if stop["signal"]:  # a second signal: stop now
            raise KeyboardInterrupt
        stop["signal"] = signal.Signals(signum).name
        display.info(f"{stop['signal']} received: finishing this step and writing a checkpoint "
                     "(send it again to stop at once)")

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    return previous


def _agreed_signal(stop: dict, accelerator) -> str | None:
    """The signal to stop on after this step, if any. The ranks of a job receive a signal at slightly different
    moments, yet stopping saves a checkpoint together (collectives): so they vote after every step (a one-number
    all-gather, the only wait per step of a multi-process run), and a signal to any rank stops them all."""
    if accelerator.num_processes == 1:
        return stop["signal"]
    mine = signal.Signals[stop["signal"]].value if stop["signal"] else 0
    agreed = int(accelerator.gather(torch.tensor([mine], device=accelerator.device)).max().item())
    return signal.Signals(agreed).name if agreed else None


def _restore_signal_handlers(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
