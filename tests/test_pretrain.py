"""Pretraining: both objectives learn, save loadable models, resume exactly, accumulate exactly."""

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import kill_and_resume, read_metrics, tiny_pretrain, write_topics
from safetensors.torch import load_file

from llmkit.tasks import make_masking
from llmkit.tokenizer import load_tokenizer


def _losses(run):
    return [m["loss"] for m in read_metrics(run) if "loss" in m]


def _same_logits(run, auto_class, input_ids):
    import transformers

    model = getattr(transformers, auto_class).from_pretrained(run).eval()
    last = sorted((run / "checkpoints").glob("step-*"))[-1]
    reference = getattr(transformers, auto_class).from_pretrained(run).eval()
    state = load_file(last / "model.safetensors")
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected
    with torch.no_grad():
        return torch.allclose(model(input_ids).logits, reference(input_ids).logits, atol=1e-6)


def test_clm_learns_and_saves_a_transformers_model(clm_run):
    run, metrics = clm_run
    losses = _losses(run)
    assert losses[-1] < losses[0] - 0.7, losses  # from ~ln(1000) = 6.9 at the start
    assert metrics["eval_loss"] < 6.0 and metrics["eval_perplexity"] > 1
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md",
                 "llmkit_run.json"):
        assert (run / name).is_file(), name
    assert (run / "best" / "model.safetensors").is_file()
    tokenizer = load_tokenizer(str(run))
    ids = torch.tensor([tokenizer("ROMEO: What light", add_special_tokens=False)["input_ids"]])
    assert _same_logits(run, "AutoModelForCausalLM", ids)


def test_mlm_learns_and_saves_a_transformers_model(mlm_run):
    run, metrics = mlm_run
    losses = _losses(run)
    assert losses[-1] < losses[0] - 0.5, losses  # masked LMs leave the unigram plateau slowly
    tokenizer = load_tokenizer(str(run))
    ids = torch.tensor([tokenizer("Good [MASK], my lord")["input_ids"]])
    assert _same_logits(run, "AutoModelForMaskedLM", ids)


def test_mlm_masking_statistics(wordpiece_dir):
    tokenizer = load_tokenizer(str(wordpiece_dir))
    masking = make_masking(tokenizer, 0.15, whole_word=False)
    ids = torch.randint(len(tokenizer.all_special_ids) + 5, len(tokenizer), (200, 512))
    ids[:, 0] = tokenizer.cls_token_id  # special tokens are never selected
    masked, labels = masking(ids, torch.Generator().manual_seed(0))
    selected = labels != -100
    assert not selected[:, 0].any()
    share = selected[:, 1:].float().mean().item()
    assert 0.145 < share < 0.155
    became_mask = (masked == tokenizer.mask_token_id) & selected
    kept = (masked == ids) & selected
    assert 0.78 < became_mask.sum().item() / selected.sum().item() < 0.82
    assert 0.085 < kept.sum().item() / selected.sum().item() < 0.115  # 10% kept, plus random draws of the same id
    assert torch.equal(masked[~selected], ids[~selected])


def test_whole_word_masking_masks_whole_words(wordpiece_dir):
    tokenizer = load_tokenizer(str(wordpiece_dir))
    masking = make_masking(tokenizer, 0.3, whole_word=True)
    text = " ".join(["unquestionably extraordinary circumstances"] * 40)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    _, labels = masking(ids, torch.Generator().manual_seed(1))
    tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
    selected = (labels[0] != -100).tolist()
    for i in range(1, len(tokens)):
        if tokens[i].startswith("##"):
            assert selected[i] == selected[i - 1], "a word was split by the mask"
    assert any(selected)


def test_continue_pretraining_from_a_saved_model(clm_run, shakespeare, tmp_path):
    run, _ = clm_run
    from llmkit.api import pretrain
    from llmkit.config import PretrainConfig, build_config

    metrics = pretrain(build_config(PretrainConfig, flags=dict(
        data=[str(shakespeare)], output=str(tmp_path / "more"), model=str(run), block_size=64, global_batch_size=16,
        max_steps=10, quiet=True, precision="fp32")))
    assert metrics["eval_loss"] < 6.0  # starts from the trained model, not from scratch (~6.9 for 1,000 tokens)


@pytest.mark.parametrize("objective, architecture, auto_class", [
    ("clm", "llama", "AutoModelForCausalLM"), ("mlm", "roberta", "AutoModelForMaskedLM")])
def test_other_architectures_learn_and_load(objective, architecture, auto_class, shakespeare, tokenizer_dir,
                                            wordpiece_dir, tmp_path):
    import transformers

    tok = tokenizer_dir if objective == "clm" else wordpiece_dir
    out = tmp_path / architecture
    metrics = tiny_pretrain(objective, shakespeare, out, tok, architecture=architecture, max_steps=60,
                            eval_every=30)
    losses = _losses(out)
    assert losses[-1] < losses[0] - (0.7 if objective == "clm" else 0.4), losses  # masked LMs learn slower
    model = getattr(transformers, auto_class).from_pretrained(out)
    assert model.config.model_type == architecture and metrics["eval_loss"] < losses[0]
    ids = torch.tensor([load_tokenizer(str(out))("Good morrow, my lord")["input_ids"]])
    assert model(ids).logits.shape[:2] == ids.shape


def test_architecture_must_fit_the_objective_and_a_fresh_model(clm_run, shakespeare, tokenizer_dir, tmp_path):
    from llmkit.errors import UsageError

    with pytest.raises(UsageError, match="does not fit --objective mlm"):
        tiny_pretrain("mlm", shakespeare, tmp_path / "x", tokenizer_dir, architecture="llama")
    with pytest.raises(UsageError, match="shape a fresh model"):
        tiny_pretrain("clm", shakespeare, tmp_path / "y", tokenizer_dir, model=str(clm_run[0]), layers=4)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def _weights(run):
    return load_file(run / "model.safetensors")


def _assert_same_weights(a, b, atol):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=atol, rtol=0), k


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_accumulation_2x_half_equals_1x_full(objective, shakespeare, tokenizer_dir, wordpiece_dir, tmp_path):
    tok = tokenizer_dir if objective == "clm" else wordpiece_dir
    tiny_pretrain(objective, shakespeare, tmp_path / "full", tok, max_steps=6, global_batch_size=16, eval_every=100)
    tiny_pretrain(objective, shakespeare, tmp_path / "half", tok, max_steps=6, global_batch_size=16,
                  micro_batch_size=8, eval_every=100)
    # fp32 sums one batch of 16 and two of 8 in different orders: the weights differed by at most 3e-6 over six
    # seeds run alone, and once by just over 1e-5 in a full-suite run; a lost or doubled micro-batch moves them by
    # about the learning rate (1e-3 here)
    _assert_same_weights(tmp_path / "full", tmp_path / "half", atol=3e-5)


def test_compile_trains_each_objective_with_dropout(shakespeare, tokenizer_dir, wordpiece_dir, tmp_path):
    """--compile with dropout: on a CPU llmkit's numpy dropout and attention step aside for the compiler's own
    (their draws broke its graphs: fine-tuning failed), and a masked LM's base model and head, which a step calls
    apart, compile too (they ran eager)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    import transformers

    from llmkit.api import finetune
    from llmkit.config import FinetuneConfig, build_config

    for objective, tok in (("clm", tokenizer_dir), ("mlm", wordpiece_dir)):
        torch._dynamo.reset()
        counters.clear()
        tiny_pretrain(objective, shakespeare, tmp_path / objective, tok, max_steps=20, log_every=5, eval_every=100,
                      dropout=0.1, compile=True, precision="bf16")
        assert counters["stats"]["unique_graphs"] > 0, objective
        losses = _losses(tmp_path / objective)
        assert losses[-1] < losses[0] - 0.15, (objective, losses)  # 20 steps from ~ln(1000) = 6.9
    torch._dynamo.reset()
    counters.clear()
    metrics = finetune(build_config(FinetuneConfig, flags=dict(
        model=str(tmp_path / "mlm"), data=[str(write_topics(tmp_path / "topics.csv"))], output=str(tmp_path / "topics"),
        max_steps=8, learning_rate=3e-3, global_batch_size=16, validation_split=0, compile=True, quiet=True)))
    assert counters["stats"]["unique_graphs"] > 0
    assert math.isfinite(metrics["train_loss"])  # compiled and eager fine-tuning (3 epochs) scored the same here
    assert transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "topics").config.num_labels == 3


def _cli(*args):
    return [sys.executable, "-m", "llmkit", *args]


def test_resume_after_sigkill_gives_the_same_weights(shakespeare, tokenizer_dir, tmp_path):
    common = ["pretrain", "--data", str(shakespeare), "--tokenizer", str(tokenizer_dir), "--model", "tiny",
              "--block-size", "64", "--global-batch-size", "16", "--max-steps", "40", "--save-every", "4",
              "--eval-every", "20", "--precision", "fp32", "--quiet", "--keep-checkpoints", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_cli(*common, "--output", str(tmp_path / "straight")), check=True, env=env)
    interrupted = tmp_path / "interrupted"
    kills = kill_and_resume(_cli(*common), interrupted, env)
    assert kills >= 2, f"the run finished before it could be killed twice ({kills!r})"
    assert (interrupted / "llmkit_run.json").is_file()
    _assert_same_weights(tmp_path / "straight", interrupted, atol=1e-6)


def test_sigterm_writes_a_checkpoint_and_says_how_to_resume(shakespeare, tokenizer_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli("pretrain", "--data", str(shakespeare), "--tokenizer", str(tokenizer_dir),
                                 "--model", "tiny", "--block-size", "64", "--max-steps", "100000", "--save-every",
                                 "100000", "--output", str(out), "--precision", "fp32"),
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").is_file() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "--resume auto" in err and "Traceback" not in err
    assert any(p.is_dir() for p in (out / "checkpoints").glob("step-*"))


@pytest.mark.parametrize("architecture", ["gpt2", "llama", "bert", "roberta"])
def test_cpu_attention_with_dropout_computes_what_sdpa_computes(architecture, tokenizer_dir, wordpiece_dir,
                                                                 monkeypatch):
    """use_fast_attention's path (CPU training with attention dropout) against SDPA: with a dropout too small to
    drop anything the logits agree, padding masks included, and every layer went through that path; with p = 0.5
    about half the probabilities drop."""
    from llmkit import tasks
    from llmkit.tasks import (_cpu_training_attention, _dropout_keep, _dropout_scale, fresh_model,
                              use_fast_attention)

    objective = "clm" if architecture in ("gpt2", "llama") else "mlm"
    tokenizer = load_tokenizer(str(tokenizer_dir if objective == "clm" else wordpiece_dir))
    torch.manual_seed(0)
    model = fresh_model(objective, "tiny", tokenizer, block_size=32, dropout=1e-6, architecture=architecture)
    input_ids = torch.randint(5, len(tokenizer), (3, 32))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 20:] = 0  # padding: the mask reaches the attention as a tensor
    attention_draws = []  # the dropout masks of attention probabilities: (batch, heads, queries, keys)
    monkeypatch.setattr(tasks, "_dropout_scale",
                        lambda x, p, *scale: attention_draws.append(x.dim() == 4) or _dropout_scale(x, p, *scale))
    with torch.no_grad():
        reference = model.eval()(input_ids=input_ids, attention_mask=attention_mask).logits
        assert use_fast_attention(model)
        fast = model.train()(input_ids=input_ids, attention_mask=attention_mask).logits
        model.config._attn_implementation = "sdpa"
    assert sum(attention_draws) == model.config.num_hidden_layers
    keep = attention_mask.bool()
    torch.testing.assert_close(fast[keep], reference[keep], atol=1e-5, rtol=1e-4)

    # the dropout itself: the same draws as a float64 reference
    q, k, v = (torch.randn(2, 2, 16, 8, dtype=torch.float64) for _ in range(3))
    module = torch.nn.Module()
    module.is_causal = True
    torch.manual_seed(1)
    out, _ = _cpu_training_attention(module, q, k, v, None, dropout=0.5, scaling=0.25)
    scores = (q @ k.transpose(-1, -2) * 0.25).masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf"))
    probs = scores.softmax(-1)
    torch.manual_seed(1)
    kept = _dropout_keep(probs, 0.5)
    assert 0.4 < kept.double().mean() < 0.6
    torch.testing.assert_close(out.transpose(1, 2), (probs * kept) @ v * 2, atol=1e-6, rtol=1e-5)  # fp32 softmax


def test_cpu_attention_with_dropout_grouped_queries_and_additive_masks():
    """The cases the presets do not reach: grouped-query attention (2 query heads per key/value head) and an
    additive float mask, against PyTorch's SDPA without dropout (a dropout of 1e-6 drops nothing here)."""
    from llmkit.tasks import _cpu_training_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 8, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    out, _ = _cpu_training_attention(module, q, k, v, None, dropout=1e-6, scaling=0.25)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                                is_causal=True, scale=0.25)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-5, rtol=1e-4)

    module.is_causal, module.num_key_value_groups = False, 1
    additive = torch.zeros(2, 1, 8, 8)
    additive[0, :, :, 5:] = torch.finfo(torch.float32).min  # the first sequence: its last 3 keys are padding
    additive[1] = torch.randn(1, 8, 8)  # any bias
    k, v = torch.randn(2, 4, 8, 16), torch.randn(2, 4, 8, 16)
    out, _ = _cpu_training_attention(module, q, k, v, additive, dropout=1e-6, scaling=0.25)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=0.25)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-5, rtol=1e-4)

    # a single key/value head that the model broadcasts itself (no num_key_value_groups), and float64 inputs
    # under bf16 autocast (which leaves them alone): both as SDPA computes them
    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = torch.randn(2, 4, 8, 16, dtype=torch.float64), *torch.randn(2, 2, 1, 8, 16, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = _cpu_training_attention(module, q, k, v, None, dropout=1e-6, scaling=0.25)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k.expand_as(q), v.expand_as(q), is_causal=True,
                                                                scale=0.25)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-6, rtol=1e-6)


def _output_and_gradients(inputs: list[torch.Tensor], grad: torch.Tensor, bf16: bool, attend) -> list[torch.Tensor]:
    """The attention output of `attend()` (computed under bf16 autocast or not) and the gradients of its inputs for
    the upstream gradient `grad`, in fp32; the inputs' gradients are cleared for the next call."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = attend()
    (out.float() * grad).sum().backward()
    result = [out.float()] + [x.grad.clone() for x in inputs]
    for x in inputs:
        x.grad = None
    return result


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cpu_causal_attention_gradients_match_sdpa(precision):
    """The causal path (mask inside the batched product, no masking in the backward pass, the softmax in the
    input precision): output and gradients of q, k and v against SDPA's, in fp32 and under bf16 autocast."""
    from llmkit.tasks import _cpu_training_attention

    torch.manual_seed(0)
    inputs = [torch.randn(2, 3, 24, 16).transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
              for _ in range(3)]  # (batch, heads, length, dim) views of (batch, length, heads, dim), as in models
    grad = torch.randn(2, 24, 3, 16)
    module = torch.nn.Module()
    module.is_causal = True
    results = [_output_and_gradients(inputs, grad, precision == "bf16", attend) for attend in (
        lambda: _cpu_training_attention(module, *inputs, None, dropout=1e-6, scaling=0.25)[0],
        lambda: torch.nn.functional.scaled_dot_product_attention(*inputs, is_causal=True, scale=0.25).transpose(1, 2))]
    tolerance = dict(atol=1e-5, rtol=1e-4) if precision == "fp32" else dict(atol=0.03, rtol=0.03)
    for fast, reference in zip(*results):
        torch.testing.assert_close(fast, reference, **tolerance)


def test_bf16_training_attention_without_dropout_takes_llmkit_path_where_sdpa_is_slow(monkeypatch):
    """Without dropout, a bf16 training step's attention up to MANUAL_BF16_MAX_LENGTH keys goes through llmkit's
    path (SDPA's fused backward pass is slow there on a CPU), with SDPA's output and gradients, padding mask
    included; evaluation, fp32 and longer sequences stay on SDPA."""
    from llmkit import tasks

    calls = []
    manual = tasks._manual_attention
    monkeypatch.setattr(tasks, "_manual_attention", lambda *a, **k: calls.append(a[1].shape[-2]) or manual(*a, **k))
    torch.manual_seed(0)
    inputs = [torch.randn(2, 3, 24, 16).requires_grad_() for _ in range(3)]
    mask = torch.ones(2, 1, 24, 24, dtype=torch.bool)
    mask[1, :, :, 17:] = False  # the second sequence ends in 7 padding positions
    grad = torch.randn(2, 24, 3, 16)
    module = torch.nn.Module()
    module.is_causal = False
    results = [_output_and_gradients(inputs, grad, True, attend) for attend in (
        lambda: tasks._cpu_training_attention(module, *inputs, mask, scaling=0.25)[0],
        lambda: torch.nn.functional.scaled_dot_product_attention(*inputs, attn_mask=mask, scale=0.25).transpose(1, 2))]
    assert calls == [24]
    for fast, reference in zip(*results):
        torch.testing.assert_close(fast, reference, atol=0.03, rtol=0.03)

    # the module's training flag decides, not the grad mode (gradient checkpointing's first pass runs without
    # grad): evaluation with grad on stays on SDPA, training without grad takes llmkit's path, up to the limit
    at_limit, beyond = ([torch.randn(1, 2, n, 8) for _ in range(3)] for n in (tasks.MANUAL_BF16_MAX_LENGTH,
                                                                             tasks.MANUAL_BF16_MAX_LENGTH + 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tasks._cpu_training_attention(module.eval(), *inputs, mask)
        with torch.no_grad():
            tasks._cpu_training_attention(module.train(), *inputs, mask)
            tasks._cpu_training_attention(module, *at_limit, None)
            tasks._cpu_training_attention(module, *beyond, None)
    tasks._cpu_training_attention(module, *inputs, mask)  # fp32
    assert calls == [24, 24, tasks.MANUAL_BF16_MAX_LENGTH]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_softmax_of_short_rows_equals_pytorchs(dtype):
    """tasks._softmax at key lengths on each of its paths (PyTorch's own, padded to 16 keys, computed in fp32): the
    probabilities within one rounding of the fp32 softmax rounded to the dtype, their gradient as float64's softmax
    gives it, rows of masked keys (the finite lowest value) included; a row masked whole spreads evenly over its real
    keys, as PyTorch's softmax does, not over the padding."""
    from llmkit.tasks import _softmax

    torch.manual_seed(0)
    lowest = torch.finfo(dtype).min
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -20  # relative: one bf16 rounding, a few fp32 ones
    for keys in (1, 5, 8, 12, 15, 16, 24, 32, 40, 100):
        scores = (torch.randn(2, 3, 7, keys) * 4).to(dtype)
        scores[0, :, :, keys // 2:] = lowest  # padding keys, as the attention masks them
        scores[1, 0] = lowest  # a head whose rows are masked whole
        scores.requires_grad_()
        grad = torch.randn(2, 3, 7, keys, dtype=dtype)
        probs = _softmax(scores)
        probs.backward(grad)
        exact = scores.detach().double().requires_grad_()
        torch.softmax(exact, dim=-1).backward(grad.double())
        assert probs.dtype == dtype and probs.shape == scores.shape and probs.is_contiguous()
        rounded = torch.softmax(scores.detach().float(), dim=-1).to(dtype)
        torch.testing.assert_close(probs.float(), rounded.float(), atol=1e-9, rtol=ulp)
        torch.testing.assert_close(probs[1, 0].float(), torch.full((7, keys), 1 / keys).to(dtype).float(), atol=0,
                                   rtol=ulp)
        # the gradient, rounded once to the dtype, within a few roundings of the exact one (whose terms cancel)
        gradient = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(scores.grad.double(), exact.grad, **gradient)


def test_fused_linear_cross_entropy_equals_the_plain_loss_and_gradients():
    """linear_cross_entropy (chunked, gradients computed in the forward pass) against F.cross_entropy over the
    full logits: the same summed loss and gradients, ignored (-100) targets included, across several chunks."""
    from llmkit.tasks import linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(300, 32, requires_grad=True)
    weight = torch.randn(500, 32, requires_grad=True)
    targets = torch.randint(0, 500, (300,))
    targets[::7] = -100
    loss = linear_cross_entropy(hidden, weight, targets, chunk=64)
    loss.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    reference = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    reference.backward()
    torch.testing.assert_close(loss.detach(), reference.detach())
    torch.testing.assert_close(grads[0], hidden.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[1], weight.grad, atol=1e-5, rtol=1e-4)


def test_fused_linear_cross_entropy_in_bf16_and_for_rows_whose_target_probability_underflows():
    """Under bf16 the loss comes from the rounded probabilities: it stays within 0.1 % of the fp32 loss of the
    same bf16 logits, and rows far beyond fp32's range (losses in the thousands, where p(target) is 0) keep their
    exact loss instead of turning infinite."""
    from llmkit.tasks import linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(300, 32).bfloat16().float().requires_grad_()
    weight = torch.randn(500, 32).bfloat16().float().requires_grad_()
    targets = torch.randint(0, 500, (300,))
    targets[::7] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, chunk=64)
    loss.backward()
    logits = (hidden.bfloat16() @ weight.bfloat16().T).float()  # what the bf16 product gives, before rounding p
    reference = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    torch.testing.assert_close(loss.detach(), reference.detach(), atol=0, rtol=1e-3)
    exact = torch.autograd.grad(torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum"),
                                (hidden, weight))
    for fast, slow in zip((hidden.grad, weight.grad), exact):
        assert torch.nn.functional.cosine_similarity(fast.flatten(), slow.flatten(), dim=0) > 0.999

    big = torch.randn(8, 32) * 40  # logits in the thousands: p(target) underflows for most rows
    loss = linear_cross_entropy(big, weight.detach(), targets[:8])
    reference = torch.nn.functional.cross_entropy(big @ weight.detach().T, targets[:8], reduction="sum")
    assert reference > 1000 and torch.isfinite(loss)
    torch.testing.assert_close(loss, reference, atol=0, rtol=1e-5)


def test_clipping_inside_fused_adamw_equals_accelerate_clipping():
    """clipped_step folds the clip factor into fused AdamW (grad_scale) and takes the norm from dot products: the
    moments and weights equal those of accelerator.clip_grad_norm_ + step, clipped or not, step after step."""
    import copy

    from accelerate import Accelerator
    from transformers import BertConfig, BertForMaskedLM

    from llmkit.train import clipped_step, make_optimizer

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)  # the same gradients on both sides
    ours = BertForMaskedLM(config)
    theirs = copy.deepcopy(ours)
    opt_ours, opt_theirs = (accelerator.prepare(make_optimizer(m, 1e-3, 0.1, (0.9, 0.95))) for m in (ours, theirs))
    assert opt_ours.optimizer.defaults["fused"]
    scales = []  # the grad_scale each of our steps saw: the folded path ran where it is set
    fused_step = opt_ours.optimizer.step

    def recording_step(*args, **kwargs):
        scales.append(getattr(opt_ours.optimizer, "grad_scale", None))
        return fused_step(*args, **kwargs)
    opt_ours.optimizer.step = recording_step
    batches = [torch.randint(0, 500, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(6)]
    for step, (ids, max_norm) in enumerate(zip(batches, (0.05, 0.2, 1e4, 0.05, 0.0, 0.1))):
        norms = []
        for model, optimizer in ((ours, opt_ours), (theirs, opt_theirs)):
            model(input_ids=ids, labels=ids).loss.backward()
            norms.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
            if model is ours:
                clipped_step(accelerator, model, optimizer, max_norm)
            else:
                if max_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), max_norm)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        assert not hasattr(opt_ours.optimizer, "grad_scale")
        assert (scales[-1] is not None) == (max_norm > 0)
        if step in (0, 1):
            assert norms[0] > 2 * max_norm and scales[-1] > 2  # the clip is active in these steps
        states = [opt.optimizer.state for opt in (opt_ours, opt_theirs)]
        # the moments are proportional to the clipped gradient: the factor must match. Entries at rounding-noise
        # level (a key bias's gradient is zero in exact arithmetic) move with the weights' rounding from step 2 on.
        scale = {key: max(float(states[1][q][key].abs().max()) for q in theirs.parameters())
                 for key in ("exp_avg", "exp_avg_sq")}
        for p, q in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
            for key in scale:
                torch.testing.assert_close(states[0][p][key], states[1][q][key], rtol=1e-5, atol=1e-6 * scale[key])

    # a state saved by a non-fused AdamW brings its own param groups (fused False): no grad_scale for them
    resumed = accelerator.prepare(make_optimizer(theirs, 1e-3, 0.1, (0.9, 0.95)))
    plain = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]}
                               for g in resumed.optimizer.param_groups], lr=1e-3, fused=False)
    theirs(input_ids=batches[0], labels=batches[0]).loss.backward()
    plain.step()
    plain.zero_grad(set_to_none=True)
    resumed.optimizer.load_state_dict(plain.state_dict())
    assert not resumed.optimizer.param_groups[0]["fused"]
    theirs(input_ids=batches[1], labels=batches[1]).loss.backward()
    clipped_step(accelerator, theirs, resumed, 0.05)  # accelerate clips: a grad_scale would fail this step
