"""What every benchmark shares: where things are, running a command (timed, logged, with its peak memory),
alternating rounds, medians, the GEMM peak, llmkit's figures from its run directory, and the result rows.

Every command runs from the repository's root, so paths read as in the anchors' docstrings (../shared/...).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench-results"  # git-ignored: the JSON, each command's output (logs/) and scratch space (work/)
ANCHORS = "../shared/anchors"
DATA = "../shared/data"
OUR_ANCHORS = "benchmarks/anchors"  # anchors the shared folder lacks: pipeline() and a bare load + classify
PYTHON = sys.executable
VENV = Path(sys.executable).parent.parent  # not resolved: the venv's python is a symlink out of the venv
MINILM = str(VENV / "models" / "all-MiniLM-L6-v2")  # unzipped there by `make install`
_ENTRY = Path(sys.executable).parent / "llmkit"
LLMKIT = [str(_ENTRY)] if _ENTRY.is_file() else [PYTHON, "-m", "llmkit"]

# llmkit flags that make its optimizer the Trainer's default one (AdamW betas 0.9/0.999, no weight decay, linear
# decay to 0, no warm-up as in the anchors), so that losses and accuracies compare like for like.
TRAINER_OPTIMIZER = ["--warmup-steps", "0", "--lr-schedule", "linear", "--min-lr-ratio", "0",
                     "--weight-decay", "0", "--adam-beta2", "0.999"]
NO_EVAL_OR_CHECKPOINT = ["--eval-every", "100000", "--save-every", "100000"]  # only at the end: outside the timing

console = Console(stderr=True, highlight=False, log_path=False)


class BenchError(Exception):
    """A benchmark could not produce its figures (a command failed, an output could not be parsed)."""


@dataclass
class Completed:
    label: str
    returncode: int
    stdout: str
    stderr: str
    seconds: float  # wall clock, process start to exit
    max_rss_mb: float  # peak resident memory of the process (and its waited-for children)


@dataclass
class Row:
    """One line of the table: llmkit's figure against a reference figure, and the goal it is held to."""

    workload: str
    measure: str
    llmkit: float | None
    reference: float | None
    unit: str
    ratio: str = ""
    mfu: str = ""
    goal: str = ""
    passed: bool | None = None  # None: information, no goal
    note: str = ""
    error: bool = False  # the benchmark could not run: the measure says why
    skipped: bool = False  # the anchor of this comparison could not run on this machine: the note says why


@dataclass
class Outcome:
    rows: list[Row]
    figures: dict[str, Any] = field(default_factory=dict)


class Bench:
    """One benchmark's run: its settings, scratch directory, logs and command runner."""

    def __init__(self, name: str, quick: bool, rounds: int, cpu_only: bool = True):
        self.name, self.quick, self.rounds = name, quick, rounds
        # The anchors train on the CPU even where there is a GPU (use_cpu=True). So that llmkit runs on the same
        # hardware, its commands see no CUDA device, except in a benchmark about the GPU (cpu_only=False).
        self.cpu_only = cpu_only
        self.work = RESULTS / "work" / name
        self.logs = RESULTS / "logs" / name
        for directory in (self.work, self.logs):
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)
        self._commands = 0
        self._files = 0

    def scratch(self, stem: str, suffix: str = "") -> Path:
        """A new path in the scratch directory (anchor --json outputs, run directories)."""
        self._files += 1
        return self.work / f"{stem}-{self._files}{suffix}"

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   LLMKIT_CACHE=str(self.work / "cache"))
        env.pop("TOKENIZERS_PARALLELISM", None)  # every command starts as a fresh process would
        if self.cpu_only:
            env["CUDA_VISIBLE_DEVICES"] = ""
        env.update(extra)
        return env

    def run(self, label: str, cmd: list[Any], env: dict[str, str] | None = None, timeout: float = 3600) -> Completed:
        """Run `cmd` from the repository root; stdout and stderr go to logs/NAME/NN-LABEL.out/.err."""
        self._commands += 1
        slug = re.sub(r"[^\w,.]+", "-", label).strip("-")
        stem = self.logs / f"{self._commands:02d}-{slug}"
        cmd = [str(c) for c in cmd]
        (stem.parent / f"{stem.name}.cmd").write_text(" ".join(cmd) + "\n")
        out_path, err_path = stem.parent / f"{stem.name}.out", stem.parent / f"{stem.name}.err"
        with open(out_path, "w") as out, open(err_path, "w") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env(), stdout=out, stderr=err,
                                    stdin=subprocess.DEVNULL)
            killer = threading.Timer(timeout, proc.kill)
            killer.start()
            try:
                _, status, usage = os.wait4(proc.pid, 0)  # wait4, not wait: it also gives this process's peak RSS
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            finally:
                killer.cancel()
            seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        done = Completed(label, proc.returncode, out_path.read_text(errors="replace"),
                         err_path.read_text(errors="replace"), seconds, usage.ru_maxrss / 1024)
        console.log(f"{self.name}: {label}: {seconds:.1f} s" + ("" if done.returncode == 0 else
                                                                f" [red]exit {done.returncode}[/red]"))
        if done.returncode != 0:
            why = f"was stopped after {timeout:.0f} s" if seconds >= timeout else \
                f"failed with exit status {done.returncode}"
            tail = "\n".join(done.stderr.strip().splitlines()[-5:])
            raise BenchError(f"{label} {why}; log: {err_path}\n{tail}")
        return done


def alternate(rounds: int, sides: dict[str, Callable[[int], Any]]) -> dict[str, list[Any]]:
    """Run the sides in turn, round after round (anchor, llmkit, anchor, llmkit, ...): a machine that slows
    down for a while slows both sides, and medians over rounds decide the ratio, not one unlucky run."""
    results: dict[str, list[Any]] = {name: [] for name in sides}
    for round_number in range(rounds):
        for name, side in sides.items():
            results[name].append(side(round_number))
    return results


def median(values: list[float]) -> float:
    return statistics.median(values)


def bf16_missing() -> str:
    """Why the anchors' bf16 configurations are not run here, or "" where they are: a CPU without bf16 instructions
    (AVX-512 BF16 or AMX) runs bf16 products emulated (a Zen 2 VM: 0.7 against fp32's 146 GFLOP/s, 1024^3), where
    a Trainer bf16 run of a benchmark would take hours. The anchors train on the CPU even where there is a GPU."""
    from llmkit.train import cpu_bf16_speedup

    if cpu_bf16_speedup() > 0:
        return ""
    return "not run: this CPU has no bf16 instructions (bf16 products run emulated)"


def runnable(names, bf16_names) -> list[str]:
    """The anchor configurations (modes, precisions) of `names` that run here: all, or those not in `bf16_names`
    where bf16 is emulated (bf16_missing)."""
    return [name for name in names if not (name in bf16_names and bf16_missing())]


def gemm_peaks(seconds: float = 1.5) -> dict[str, float]:
    """GFLOP/s of a 1024 x 1024 @ 1024 x 1024 matmul in fp32 and bf16, measured the way anchor_clm.py does (with
    one product of bf16 where bf16 is emulated: ~3 s each)."""
    import torch

    emulated = bool(bf16_missing())

    def peak(dtype) -> float:
        a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        if emulated and dtype == torch.bfloat16:
            start = time.perf_counter()
            a @ b
            return 2 * 1024 ** 3 / (time.perf_counter() - start) / 1e9
        for _ in range(3):
            a @ b
        start, count = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            a @ b
            count += 1
        return 2 * 1024 ** 3 * count / (time.perf_counter() - start) / 1e9

    return {"fp32": peak(torch.float32), "bf16": peak(torch.bfloat16)}


def cuda_peaks(seconds: float = 1.0, size: int = 8192) -> dict[str, Any]:
    """The first CUDA GPU's name and the GFLOP/s of a size^3 product on it in bf16 (where the GPU has it natively)
    and fp16, timed with CUDA events after warm-up. Run it in a child process (bench.run, CUDA_PEAKS): a CUDA
    context left in the harness's process would hold GPU memory while llmkit trains, or keep llmkit off a GPU in
    exclusive-process mode."""
    import torch

    peaks: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0)}
    dtypes = {"fp16": torch.float16}
    if torch.cuda.is_bf16_supported(including_emulation=False):
        dtypes["bf16"] = torch.bfloat16
    for name, dtype in dtypes.items():
        a, b = (torch.randn(size, size, dtype=dtype, device="cuda") for _ in range(2))
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        count, begun = 0, time.perf_counter()
        start.record()
        while time.perf_counter() - begun < seconds:
            a @ b
            count += 1
        end.record()
        torch.cuda.synchronize()
        peaks[name] = 2 * size ** 3 * count / (start.elapsed_time(end) / 1e3) / 1e9
    return peaks


# `bench.run(label, CUDA_PEAKS)` prints cuda_peaks() as one JSON line
CUDA_PEAKS = [PYTHON, "-c", "import json, sys; sys.path.insert(0, 'benchmarks'); import harness; "
                            "print(json.dumps(harness.cuda_peaks()))"]

# Dense bf16 / fp16 tensor-core peaks from the vendor's datasheets, GFLOP/s, by a part of the device's name (the
# first that matches): MFU is usually quoted against these, which cuBLAS's products reach only in part.
DATASHEET_PEAKS = (("H100 PCIe", 756_000), ("H100 NVL", 835_000), ("H100", 989_000), ("H200", 989_000),
                   ("A100", 312_000))


def datasheet_peak(gpu: str) -> float | None:
    return next((peak for part, peak in DATASHEET_PEAKS if part in gpu), None)


def json_line(text: str) -> dict[str, Any]:
    """The last line of a command's output that is a JSON object (llmkit's --json summaries)."""
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise BenchError(f"no JSON object in the output:\n{text[-500:]}")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------------
# llmkit's commands and figures


def llmkit_tokenize(bench: Bench, label: str, args: list[Any],
                    env: dict[str, str] | None = None) -> tuple[dict, Completed]:
    """`llmkit tokenize ARGS --json --quiet`: its JSON summary and the finished command."""
    done = bench.run(label, [*LLMKIT, "tokenize", *args, "--validation-split", "0", "--json", "--quiet"], env=env)
    return json_line(done.stdout), done


def precision_of(llmkits: list[dict[str, Any]]) -> str:
    """The precision llmkit's runs trained in (what --precision auto picked); every round must agree."""
    found = {l["plan"]["precision"] for l in llmkits}
    if len(found) > 1:
        raise BenchError(f"llmkit's rounds trained in different precisions ({', '.join(sorted(found))}): the bf16 "
                         "speed check gave different answers; pass --precision to compare like with like")
    return found.pop()


def training_figures(run_dir: Path, rate_key: str) -> dict[str, Any]:
    """Throughput and losses of an llmkit training run, from its metrics.jsonl.

    Throughput: items over time across all log windows but the first (warm-up), i.e. the step-weighted harmonic
    mean of the windows' rates (`rate_key`: tokens_per_second or samples_per_second; items per step are fixed)."""
    lines = read_jsonl(run_dir / "metrics.jsonl")
    windows = [line for line in lines if rate_key in line]
    if len(windows) < 2:
        raise BenchError(f"{run_dir}/metrics.jsonl has {len(windows)} log window(s): 2 or more are needed (one is "
                         "skipped as warm-up); lower --log-every")
    ends = [w["step"] for w in windows]
    sizes = [end - start for start, end in zip([0, *ends], ends)]
    timed = list(zip(sizes, windows))[1:]
    rate = sum(s for s, _ in timed) / sum(s / w[rate_key] for s, w in timed)
    evals = [line for line in lines if "eval_accuracy" in line or "eval_loss" in line]
    record = json.loads((run_dir / "llmkit_run.json").read_text())
    return {"rate": rate, "windows": windows, "timed_steps": (ends[0] + 1, ends[-1]),
            "mean_loss": sum(s * w["loss"] for s, w in zip(sizes, windows)) / sum(sizes),
            "eval": evals[-1] if evals else {}, "parameters": record.get("parameters"), "plan": record.get("plan")}


def llmkit_pretrain(bench: Bench, label: str, data: Path, output: Path, *, objective: str, size: list[str],
                    block: int, batch: int, steps: int, log_every: int, learning_rate: float) -> dict[str, Any]:
    """`llmkit pretrain` in its default precision (auto: bf16 where this CPU's bf16 products are fast, else fp32)
    with the anchor's model, batch, steps, learning rate and dropout (0.1, the GPT2Config / BertConfig default the
    anchors keep), optimizer as the Trainer's; its training figures."""
    bench.run(label, [*LLMKIT, "pretrain", "--data", data, "--output", output, "--objective", objective, *size,
                      "--block-size", block, "--global-batch-size", batch, "--max-steps", steps,
                      "--log-every", log_every, "--learning-rate", learning_rate, "--dropout", "0.1",
                      *TRAINER_OPTIMIZER, *NO_EVAL_OR_CHECKPOINT, "--precision", "auto", "--validation-split", "0",
                      "--overwrite", "--quiet"])
    return training_figures(output, "tokens_per_second")


# ---------------------------------------------------------------------------------------------------------------
# Rows: one comparison each, with its goal


def _ratio(llmkit: float, reference: float) -> float:
    return llmkit / reference if reference else float("nan")


def at_least(workload: str, measure: str, llmkit: float, reference: float, unit: str, minimum: float | None,
             mfu: str = "", note: str = "") -> Row:
    """Higher is better; the goal (if any) is llmkit / reference >= minimum."""
    ratio = _ratio(llmkit, reference)
    return Row(workload, measure, llmkit, reference, unit, f"{ratio:.2f}x", mfu,
               f">= {minimum:g}x" if minimum else "", ratio >= minimum if minimum else None, note)


def at_most(workload: str, measure: str, llmkit: float, reference: float, unit: str, maximum: float,
            note: str = "") -> Row:
    """Lower is better (memory, start-up time); the goal is llmkit / reference <= maximum."""
    ratio = _ratio(llmkit, reference)
    return Row(workload, measure, llmkit, reference, unit, f"{ratio:.2f}x", "", f"<= {maximum:g}x",
               ratio <= maximum, note)


def close(workload: str, measure: str, llmkit: float, reference: float, unit: str, tolerance: float,
          note: str = "") -> Row:
    """Equal work: llmkit's figure within `tolerance` (relative) of the reference."""
    ratio = _ratio(llmkit, reference)
    return Row(workload, measure, llmkit, reference, unit, f"{ratio:.3f}x", "", f"within {tolerance:.0%}",
               abs(ratio - 1) <= tolerance, note)


def within_points(workload: str, measure: str, llmkit: float, reference: float, points: float,
                  note: str = "") -> Row:
    """Accuracies (fractions) within `points` percentage points."""
    gap = (llmkit - reference) * 100
    return Row(workload, measure, llmkit, reference, "%", f"{gap:+.2f} pt", "", f"within {points:g} pt",
               abs(gap) <= points, note)


def info(workload: str, measure: str, llmkit: float, reference: float | None, unit: str, mfu: str = "",
         note: str = "") -> Row:
    """A figure shown for context, without a goal."""
    ratio = f"{_ratio(llmkit, reference):.2f}x" if reference else ""
    return Row(workload, measure, llmkit, reference, unit, ratio, mfu, "", None, note)


def threshold(workload: str, measure: str, llmkit: float, unit: str, minimum: float, reference: float | None = None,
              note: str = "") -> Row:
    """llmkit's own figure against an absolute goal (MFU, agreement); the reference is shown for context."""
    shown = f"{minimum * 100:g} %" if unit == "%" else f"{minimum:g}"
    return Row(workload, measure, llmkit, reference, unit, "", "", f">= {shown}", llmkit >= minimum, note)


def not_run(workload: str, measure: str, llmkit: float | None, unit: str, why: str) -> Row:
    """A comparison whose anchor could not run on this machine: llmkit's figure, no ratio, no goal."""
    return Row(workload, measure, llmkit, None, unit, goal="-", passed=None, note=why, skipped=True)


def mfu_text(llmkit: float, anchor: float) -> str:
    return f"{llmkit * 100:.0f}% / {anchor * 100:.0f}%"


# ---------------------------------------------------------------------------------------------------------------
# The table and the JSON


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "%":
        return f"{value * 100:.1f} %"
    if unit == "loss":
        return f"{value:.3f}"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "MB":
        return f"{value:,.0f} MB"
    if unit == "M tok/s":
        return f"{value / 1e6:.2f} M tok/s"
    if unit == "M":
        return f"{value / 1e6:.2f} M"
    digits = 0 if abs(value) >= 1000 else 1
    return f"{value:,.{digits}f} {unit}"


def print_table(rows: list[Row], title: str, caption: str) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, caption=caption, header_style="bold", show_lines=False)
    for column, justify in (("workload", "left"), ("measure", "left"), ("llmkit", "right"),
                            ("anchor / reference", "right"), ("ratio", "right"), ("MFU llmkit / anchor", "right"),
                            ("goal", "left"), ("result", "left")):
        table.add_column(column, justify=justify)
    previous = None
    for row in rows:
        result = "[red]ERROR[/red]" if row.error else "[dim]not run[/dim]" if row.skipped else \
            {True: "[green]pass[/green]", False: "[red]FAIL[/red]", None: "[dim]info[/dim]"}[row.passed]
        measure = escape(row.measure) + (f"\n[dim]{escape(row.note)}[/dim]" if row.note else "")
        if previous is not None and row.workload != previous:
            table.add_section()
        table.add_row(escape(row.workload) if row.workload != previous else "", measure,
                      _number(row.llmkit, row.unit), _number(row.reference, row.unit), row.ratio, row.mfu,
                      row.goal, result)
        previous = row.workload
    out = Console(highlight=False)
    if not out.is_terminal:  # a log file or a pipe: wide enough for the table rather than 80 columns
        out = Console(highlight=False, width=180)
    out.print(table)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)
