"""What a user sees around a run: help examples, the dry-run plan, JSON and quiet output, the live progress of
tokenizing, training and evaluating, curves, model cards, TensorBoard logs, tokenizer round trips, and the loop's
batch and schedule arithmetic."""

import io
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_pretrain
from typer.testing import CliRunner

from llmkit.cli import app

LLMKIT = shutil.which("llmkit", path=str(Path(sys.executable).parent)) or "llmkit"
COMMANDS = ("tokenize", "pretrain", "finetune", "evaluate", "classify", "generate", "fill", "env", "recipes", "plot")


@pytest.mark.parametrize("name", COMMANDS)
def test_every_help_shows_an_example(name):
    result = CliRunner().invoke(app, [name, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "Example:" in result.output and f"llmkit {name}" in result.output.split("Example:")[1]


@pytest.mark.parametrize("tokenizer_type", ["bpe", "wordpiece", "unigram"])
def test_trained_tokenizers_load_in_transformers_and_round_trip(shakespeare, tmp_path, tokenizer_type):
    from transformers import AutoTokenizer

    from llmkit.api import tokenize
    from llmkit.config import TokenizeConfig

    out = tmp_path / tokenizer_type
    summary = tokenize(TokenizeConfig(data=[str(shakespeare)], output=str(out), vocab_size=600,
                                      tokenizer_type=tokenizer_type, quiet=True))
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == 600 == summary["vocab_size"]
    assert summary["tokens"] > 20_000 and summary["documents"] > 100
    text = "ROMEO: But, soft! what light through yonder window breaks?"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids  # everything in this line was seen in training
    decoded = tokenizer.decode(ids)
    if tokenizer_type == "wordpiece":  # BERT-style decoding puts spaces around punctuation
        assert decoded.replace(" ", "") == text.replace(" ", "")
    else:
        assert decoded == text
    if tokenizer_type == "bpe":
        assert tokenizer.eos_token is not None
    else:
        assert tokenizer.mask_token is not None and tokenizer.pad_token is not None


def test_dry_run_prints_the_plan_and_writes_nothing(tokenizer_dir, tmp_path):
    out = tmp_path / "never"
    r = subprocess.run([LLMKIT, "pretrain", "--data", str(tokenizer_dir), "--output", str(out), "--model", "tiny",
                        "--block-size", "64", "--global-batch-size", "16", "--max-steps", "500", "--dry-run",
                        "--json", "--precision", "fp32"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["steps"] == 500 and plan["examples_per_step"] == 16 and plan["tokens_per_step"] == 16 * 64
    assert plan["training_tokens"] == 500 * 16 * 64
    assert plan["total_flops"] > 6 * plan["parameters"] * plan["training_tokens"]
    assert plan["precision"] == "fp32" and plan["processes"] == 1
    assert plan["seconds_per_step"] > 0 and plan["estimated_hours"] > 0 and plan["memory_gb_estimate"] > 0
    assert not out.exists()


def test_json_and_quiet_final_result(tokenizer_dir, tmp_path):
    common = ["pretrain", "--data", str(tokenizer_dir), "--model", "tiny", "--block-size", "64",
              "--global-batch-size", "16", "--max-steps", "4", "--precision", "fp32"]
    r = subprocess.run([LLMKIT, *common, "--output", str(tmp_path / "a"), "--json"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["step"] == 4
    r = subprocess.run([LLMKIT, *common, "--output", str(tmp_path / "b"), "--quiet"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and len(r.stdout.strip().splitlines()) == 1 and "train_loss" in r.stdout


def _console(monkeypatch, terminal: bool) -> io.StringIO:
    """llmkit's stderr console writing into a buffer that rich takes for a terminal or for a log file."""
    from rich.console import Console

    from llmkit import display

    buffer = io.StringIO()
    width = 200 if terminal else None  # a log file: rich's default of 80 columns
    monkeypatch.setattr(display, "err", Console(file=buffer, force_terminal=terminal, width=width, color_system=None,
                                                highlight=False))
    monkeypatch.setattr(display, "_state", {"quiet": False, "verbose": False})  # restored after the test
    return buffer


@pytest.fixture
def terminal(monkeypatch) -> io.StringIO:
    return _console(monkeypatch, terminal=True)


@pytest.fixture
def log_file(monkeypatch) -> io.StringIO:
    return _console(monkeypatch, terminal=False)


def _screen_lines(raw: str) -> list[str]:
    """Every line the live display drew, without cursor moves (each refresh redraws the lines)."""
    return [line.strip() for line in re.split(r"[\r\n]", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "\n", raw))
            if line.strip()]


def _drew(lines: list[str], pattern: str) -> bool:
    return any(re.search(pattern, line) for line in lines)


def _evaluate_config(model, data, tmp_path, **flags):
    from llmkit.config import EvaluateConfig, build_config

    settings = dict(model=str(model), eval_data=[str(data)], batch_size=8, precision="fp32", max_samples=300,
                    cache_dir=str(tmp_path / "cache"))
    settings.update(flags)
    return build_config(EvaluateConfig, flags=settings)


def test_training_shows_tokenizing_and_each_evaluation_as_a_passing_line(shakespeare, tokenizer_dir, tmp_path,
                                                                       terminal):
    cache = tmp_path / "cache"
    tiny_pretrain("clm", shakespeare, tmp_path / "run", tokenizer_dir, max_steps=4, log_every=2, eval_every=2,
                  eval_batches=2, quiet=False, cache_dir=str(cache))
    raw = terminal.getvalue()
    lines = _screen_lines(raw)
    info = json.loads(next(cache.glob("lm-*/llmkit_dataset.json")).read_text())
    documents, tokens = info["documents"] + info["validation_documents"], info["tokens"] + info["validation_tokens"]
    assert _drew(lines, rf"^tokenize .*\b{documents}/\? +tokens {tokens}\b"), lines
    final_eval = math.ceil(info["validation_tokens"] // 64 / 16)  # all held-out blocks, 16 a batch
    assert final_eval > 2
    assert _drew(lines, r"^evaluate .* 2/2 +loss \S+ +tok/s ")  # step 2: --eval-batches 2
    assert _drew(lines, rf"^evaluate .* {final_eval}/{final_eval} +loss ")  # the last step: all of them
    assert _drew(lines, r"^train .* 4/4 +loss \S+ +lr \S+ +tok/s \S+ +eval_loss ")
    last_frame = raw.rsplit("\x1b[2K", 1)[1]  # what stays on the screen: the evaluation lines are gone
    assert "train" in last_frame and "4/4" in last_frame and "evaluate" not in last_frame
    assert not _drew(lines, r"\(cpu|\(cuda")  # inside training the device is on the training's own line


def test_evaluate_shows_its_batches_device_and_precision(clm_run, shakespeare, tmp_path, terminal):
    from llmkit.api import evaluate

    metrics = evaluate(_evaluate_config(clm_run[0], shakespeare, tmp_path))
    lines = _screen_lines(terminal.getvalue())
    batches = math.ceil(metrics["blocks"] / 8)
    assert _drew(lines, rf"^evaluate \((cpu|cuda) fp32\) .* {batches}/{batches} +loss \S+ +tok/s "), lines
    assert _drew(lines, r"^tokenize .* 300/\? +tokens ")  # --max-samples 300 documents, into the cache


def test_finetune_data_shows_tokenizing_progress(sst2, tokenizer_dir, tmp_path, terminal):
    from llmkit import data as pipeline
    from llmkit.tokenizer import load_tokenizer

    dataset, _ = pipeline.prepare_classification([str(sst2["train"])], load_tokenizer(str(tokenizer_dir)), None,
                                                 text_column=None, text_pair_column=None, label_column=None,
                                                 max_length=64, cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == 600
    assert _drew(_screen_lines(terminal.getvalue()), r"^tokenize .* 600/600")


def test_progress_is_silent_in_logs_and_when_quiet(clm_run, shakespeare, tokenizer_dir, tmp_path, monkeypatch):
    from llmkit.api import evaluate

    log = _console(monkeypatch, terminal=False)
    evaluate(_evaluate_config(clm_run[0], shakespeare, tmp_path / "a"))
    assert log.getvalue() == ""  # nothing but the result (printed by the CLI on stdout)
    tiny_pretrain("clm", shakespeare, tmp_path / "run", tokenizer_dir, max_steps=4, log_every=2, eval_every=2,
                  quiet=False, cache_dir=str(tmp_path / "b"))
    lines = log.getvalue().splitlines()
    assert "\x1b" not in log.getvalue() and any(line.startswith("train step 4/4") for line in lines), lines
    # one line, not cut at 80
    assert any(line.startswith("clm ") and line.endswith(" fp32; evaluates every 2 steps") for line in lines), lines
    assert not any(line.startswith(("tokenize", "evaluate")) for line in lines)  # plain step lines only
    screen = _console(monkeypatch, terminal=True)
    evaluate(_evaluate_config(clm_run[0], shakespeare, tmp_path / "c", quiet=True))
    assert screen.getvalue() == ""


def test_a_run_leaves_curves_and_a_model_card(clm_run):
    run, metrics = clm_run
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (run / "README.md").read_text()
    assert "from_pretrained" in card and "llmkit" in card
    assert f"{metrics['eval_loss']:.4g}" in card  # the final metrics are written into the card
    assert (run / "best" / "README.md").is_file()


def test_report_to_tensorboard_writes_events(shakespeare, tokenizer_dir, tmp_path):
    pytest.importorskip("tensorboard")  # a test extra: `make install` installs it
    out = tmp_path / "tb"
    tiny_pretrain("clm", shakespeare, out, tokenizer_dir, max_steps=10, log_every=5, eval_every=5,
                  report_to=["tensorboard"])
    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(events[0].parent)).Reload().Tags()["scalars"]
    assert "train/loss" in scalars and "eval/loss" in scalars


def test_report_to_a_tracker_that_is_not_installed_is_a_usage_error(tmp_path):
    from llmkit.errors import UsageError
    from llmkit.train import check_trackers

    with pytest.raises(UsageError, match="pip install"):
        check_trackers(["tensorboard", "wandb"] if not _installed("wandb") else ["no-such-tracker"])


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


class _Rows(list):
    """Examples as the plan sees training and evaluation data: a count and lengths(), all `length` long (None:
    packed blocks, whose lengths() is None)."""

    def __init__(self, n: int, length: int | None):
        super().__init__(range(n))
        self.length = length

    def lengths(self):
        return None if self.length is None else np.full(len(self), self.length)


def _plan(n=1000, tokens_per_example=64, eval_data=None, blocks=True, **cfg):
    """The plan of a language-model run on `n` packed blocks of `tokens_per_example` tokens, or with blocks=False of
    a classification run on `n` examples of that many tokens."""
    from llmkit.train import TrainJob, make_plan

    settings = dict(global_batch_size=None, micro_batch_size=None, tokens_per_step=None, max_steps=None,
                    max_tokens=None, epochs=None, warmup_steps=None, learning_rate=None, eval_every=None,
                    save_every=None)
    settings.update(cfg)
    job = TrainJob(cfg=SimpleNamespace(**settings), objective="clm" if blocks else "classification", model=None,
                   tokenizer=None, train_data=_Rows(n, None if blocks else tokens_per_example), eval_data=eval_data,
                   default_learning_rate=1e-3, default_global_batch=32,
                   tokens_per_example=tokens_per_example if blocks else None)
    return make_plan(job, processes=1, precision="fp32")


def test_batch_arithmetic():
    plan = _plan(tokens_per_step=64 * 48, micro_batch_size=16)
    assert plan.global_batch == 48 and plan.accumulation == 3 and plan.steps == 1000 // 48
    plan = _plan(max_tokens=10 * 32 * 64 + 1)  # a partial step still counts
    assert plan.steps == 11
    plan = _plan(epochs=2.5)
    assert plan.steps == math.ceil(2.5 * (1000 // 32))
    assert plan.warmup == math.ceil(0.06 * plan.steps) and plan.eval_every == math.ceil(plan.steps / 10)
    assert _plan(max_steps=100, warmup_steps=0.25).warmup == 25


def test_default_evaluations_take_at_most_a_fifth_of_the_training():
    """Without --eval-every a run evaluates about ten times, fewer where the evaluations (a forward pass over the
    evaluation data: a third of a training step's work per token), the last one over the whole set included, would
    take over a fifth of the training; checkpoints stay at about ten a run."""
    def plan(rows, **cfg):  # SST-2-like rows of 13 tokens, evaluated on 872 rows of 25
        return _plan(rows, tokens_per_example=13, eval_data=_Rows(872, 25), blocks=False, **cfg)

    # 2,000 rows (62 steps of 32): the last evaluation alone costs 872 * 25 / (3 * 62 * 32 * 13) = 28 %
    assert (plan(2000).steps, plan(2000).eval_every, plan(2000).save_every) == (62, 62, 7)
    # 8,000 rows: one evaluation costs 872 * 25 / (3 * 250 * 32 * 13) = 7 % of the training, two fit in a fifth
    assert plan(8000).eval_every == 125
    # a sample of 10 batches (320 rows: 2.6 %) beside the last, full one: 1 + 5
    assert plan(8000, eval_batches=10).eval_every == math.ceil(250 / 6)
    # 60,000 rows: evaluating is cheap beside the training, so ten times as before
    assert plan(60_000).eval_every == math.ceil(1875 / 10)
    # --patience counts evaluations: ten; --eval-every is kept and sets the checkpoints too
    assert plan(8000, patience=3).eval_every == 25
    assert (plan(8000, eval_every=5).eval_every, plan(8000, eval_every=5).save_every) == (5, 5)
    # packed blocks of 64 tokens (lengths() None): 100 evaluated against 31 steps of 32 trained, 3.4 % each
    assert _plan(1000, eval_data=_Rows(100, None)).eval_every == math.ceil(31 / 5)


def test_schedule_shape():
    from llmkit.train import lr_lambda

    cosine = lr_lambda(10, 110, "cosine", 0.1)
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == pytest.approx(1.0)
    assert cosine(60) == pytest.approx(0.55) and cosine(110) == pytest.approx(0.1)
    linear = lr_lambda(0, 100, "linear", 0.0)
    assert linear(0) == 1.0 and linear(50) == pytest.approx(0.5) and linear(100) == 0.0
    assert lr_lambda(5, 100, "constant", 0.1)(80) == 1.0


def test_weight_decay_spares_biases_and_norms():
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmkit.train import make_optimizer

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16))
    decayed, spared = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95)).param_groups
    assert decayed["weight_decay"] == 0.1 and spared["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 for p in decayed["params"])
    assert {names[id(p)].rsplit(".", 1)[-1] for p in spared["params"]} == {"bias", "weight"}  # ln_*.weight
    assert all("ln" in names[id(p)] or names[id(p)].endswith("bias") for p in spared["params"])


def test_gradient_checkpointing_gives_the_same_weights(shakespeare, tokenizer_dir, tmp_path):
    from safetensors.torch import load_file

    plain, checkpointed = tmp_path / "plain", tmp_path / "ckpt"
    tiny_pretrain("clm", shakespeare, plain, tokenizer_dir, max_steps=3, eval_every=100)
    tiny_pretrain("clm", shakespeare, checkpointed, tokenizer_dir, max_steps=3, eval_every=100,
                  gradient_checkpointing=True)
    a, b = load_file(plain / "model.safetensors"), load_file(checkpointed / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_freed_memory_is_reused_without_page_faults():
    """After keep_freed_memory (training on a CPU sets it), a large block freed and allocated again comes back
    from the process's heap: no page faults, where glibc's default unmaps it and faults its 65,536 pages back in
    every time. Each case runs in a fresh process, as a command does (a long-lived process's heap is another)."""
    import subprocess
    import sys

    script = """if True:
        import resource, sys, torch
        from llmkit.train import keep_freed_memory
        kept = keep_freed_memory() if sys.argv[1] == "keep" else False
        faults = []
        for _ in range(6):  # 256 MB: allocated, touched and freed
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            torch.ones(64 << 20)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        print(kept, *faults)
    """

    def page_faults(mode: str) -> tuple[str, list[int]]:
        done = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True)
        kept, *faults = done.stdout.split()
        return kept, [int(f) for f in faults[3:]]  # the heap settles within the first three

    kept, faults = page_faults("keep")
    if kept != "True":
        pytest.skip("glibc's malloc only")
    default = page_faults("default")[1]  # 65,537 each with 4 KB pages; fewer with huge pages
    assert max(faults) < 1000 and 20 * max(max(faults), 1) < min(default), (faults, default)


def test_fast_dropout_is_dropout():
    from llmkit.tasks import FastDropout, _dropout_keep, _dropout_scale, use_fast_dropout

    torch.manual_seed(0)
    dropout = FastDropout(0.1).train()
    x = torch.ones(300_001, requires_grad=True)
    y = dropout(x)
    assert abs((y == 0).float().mean().item() - 0.1) < 0.003  # 5 standard deviations
    lanes = (y[:300_000] == 0).view(-1, 4).float().mean(0)  # each 16-bit lane of the 64-bit draws is uniform
    assert ((lanes - 0.1).abs() < 0.0055).all(), lanes
    assert _dropout_keep(x, 1 - 1e-6).sum() < 20  # p near 1 drops nearly everything (the threshold does not wrap)
    values = y.detach().unique().tolist()
    assert len(values) == 2 and values[0] == 0 and values[1] == pytest.approx(1 / 0.9)
    y.sum().backward()
    assert torch.equal(x.grad, (y.detach() != 0).float() / 0.9)
    torch.manual_seed(1)
    first = dropout(x)
    torch.manual_seed(1)
    assert torch.equal(first, dropout(x))  # the global generator: seeded and resumed runs repeat
    assert dropout.eval()(x) is x
    for dtype in (torch.float32, torch.bfloat16):  # factors from numpy: the same draws and floats as PyTorch's path
        low = x.detach().to(dtype)
        for p in (0.1, 0.5, 1 - 1e-6):
            for scale in (1, 1 / (1 - p)):
                torch.manual_seed(2)
                factors = _dropout_scale(low, p, scale)
                torch.manual_seed(2)
                assert torch.equal(factors, _dropout_keep(low, p).to(dtype) * scale), (dtype, p, scale)
                assert factors.dtype == dtype and factors.shape == x.shape
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16))
    assert use_fast_dropout(model) == 1 + 2 * 3  # embeddings, and per block attention, residual, MLP
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())


def test_fast_gelu_is_the_tanh_gelu():
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmkit.tasks import GELU_CHUNK, GELU_MIN, FastGeluTanh, use_fast_gelu

    torch.manual_seed(0)
    gelu = FastGeluTanh()
    # a size over a chunk that is not a multiple of it, a value range wider than activations reach
    x64 = torch.cat([torch.linspace(-12, 12, 100_001, dtype=torch.float64),
                     torch.randn(GELU_CHUNK + 12_345, dtype=torch.float64) * 3]).view(-1, 7)
    for dtype in (torch.float32, torch.bfloat16):
        x = x64.to(dtype).requires_grad_()
        before = x.detach().clone()
        y = gelu(x).detach()
        assert torch.equal(x.detach(), before)  # the input untouched (fp32 chunks are views of it)
        reference = torch.nn.functional.gelu(x.detach(), approximate="tanh")
        exact = torch.nn.functional.gelu(x.detach().double(), approximate="tanh")
        assert y.dtype == dtype and y.shape == x.shape
        # as close to the exact function as PyTorch's kernel, within a rounding step of the largest output
        ours, theirs = (y.double() - exact).abs(), (reference.double() - exact).abs()
        ulp = 2.0 ** -23 if dtype == torch.float32 else 2.0 ** -8
        assert ours.max() <= theirs.max() + ulp * exact.abs().max(), (dtype, ours.max(), theirs.max())
        # and for |x| <= 3 each value as near as PyTorch's or within 8 rounding steps of its own size (beyond, the
        # tail's relative error grows with |x (a + b x^2)| in the sigmoid form; 1 + tanh cancels in PyTorch's)
        bulk = x.detach().abs() <= 3
        assert (ours[bulk] <= torch.maximum(theirs[bulk], 8 * ulp * exact[bulk].abs())).all(), dtype
        if dtype == torch.bfloat16:  # computed in fp32 either way, rounded once: mostly the same bf16 values
            differ = y != reference
            assert differ[x.detach().abs() < 3].float().mean() < 0.01
            # the others in the far negative tail, where 1 + tanh cancels and the sigmoid form is the closer
            assert (ours[differ] < theirs[differ]).float().mean() > 0.6
        grad = torch.randn_like(x)
        out = gelu(x)
        assert type(out.grad_fn).__name__ == "_GeluTanhBackward"  # the chunked path, not PyTorch's kernel
        out.backward(grad)
        # the backward pass is PyTorch's own tanh-GELU derivative: the same gradient, bit for bit
        assert torch.equal(x.grad, torch.ops.aten.gelu_backward(grad, x.detach(), approximate="tanh"))
    small = torch.randn(GELU_MIN - 1)
    assert torch.equal(gelu(small), torch.nn.functional.gelu(small, approximate="tanh"))
    strided = torch.randn(GELU_MIN, 2)[:, 0]  # not contiguous: PyTorch's kernel
    assert torch.equal(gelu(strided), torch.nn.functional.gelu(strided, approximate="tanh"))

    for activation in ("gelu_pytorch_tanh", "gelu_python_tanh", "gelu_new", "gelu_fast", "gelu_accurate", "gelu"):
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16,
                                           activation_function=activation))
        keys = model.state_dict().keys()
        assert use_fast_gelu(model) == (0 if activation == "gelu" else 2)  # the erf GELU is another function
        assert model.state_dict().keys() == keys and model.config.activation_function == activation
