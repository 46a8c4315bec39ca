"""What differs between clm, mlm and classification: the model class, how a batch becomes a loss, the metrics.

Everything else (data pipeline, loop, checkpoints, evaluation) is shared. Losses are returned as *sums* with
the number of items they cover, so that gradient accumulation and data parallelism can divide by the item
count of the whole global batch: 2 micro-batches of B/2 then give exactly the update of one batch of B, even
when micro-batches hold different numbers of masked tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from llmkit.errors import LlmkitError, UsageError
from llmkit.hub import from_pretrained_or_explain, safetensors_only

# Size presets: (layers, hidden, heads, block size). `tiny` trains in seconds on a CPU; the larger ones match
# well-known models so that published numbers are a reference.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"layers": 2, "hidden": 64, "heads": 2, "block_size": 128},
    "mini": {"layers": 4, "hidden": 256, "heads": 4, "block_size": 256},
    "small": {"layers": 6, "hidden": 384, "heads": 6, "block_size": 256},
    "base": {"layers": 12, "hidden": 768, "heads": 12, "block_size": 512},
    "gpt2-small": {"layers": 12, "hidden": 768, "heads": 12, "block_size": 1024},
    "bert-base": {"layers": 12, "hidden": 768, "heads": 12, "block_size": 512},
    "gpt2-medium": {"layers": 24, "hidden": 1024, "heads": 16, "block_size": 1024},
}


def model_class(objective: str):
    import transformers

    return {"clm": transformers.AutoModelForCausalLM, "mlm": transformers.AutoModelForMaskedLM,
            "classification": transformers.AutoModelForSequenceClassification}[objective]


# Architectures of a fresh model, per objective; the first is the default.
ARCHITECTURES = {"clm": ("gpt2", "llama"), "mlm": ("bert", "roberta")}


def fresh_model(objective: str, preset: str, tokenizer, *, layers=None, hidden=None, heads=None,
                block_size: int, dropout: float = 0.0, architecture: str | None = None):
    """A randomly initialised model of a preset size, with PyTorch SDPA attention: GPT-2 or Llama (RoPE, RMSNorm,
    SwiGLU) for clm, BERT or RoBERTa for mlm."""
    architecture = architecture or ARCHITECTURES[objective][0]
    if architecture not in ARCHITECTURES[objective]:
        raise UsageError(f"--architecture {architecture} does not fit --objective {objective}: use one of "
                         f"{', '.join(ARCHITECTURES[objective])}")
    size = dict(PRESETS[preset])
    size.update({k: v for k, v in (("layers", layers), ("hidden", hidden), ("heads", heads)) if v is not None})
    if size["hidden"] % size["heads"]:
        raise UsageError(f"--hidden {size['hidden']} is not divisible by --heads {size['heads']}: pick sizes where "
                         "it is (for example hidden 256 with 4 heads)")
    vocab = len(tokenizer)
    positions = max(block_size, size["block_size"])
    config = _fresh_config(architecture, tokenizer, vocab, positions, size, dropout)
    return model_class(objective).from_config(config, attn_implementation="sdpa")


def _fresh_config(architecture: str, tokenizer, vocab: int, positions: int, size: dict, dropout: float):
    from transformers import BertConfig, GPT2Config, LlamaConfig, RobertaConfig

    if architecture == "llama":
        # SwiGLU's hidden width: 8/3 of the model width (Llama's rule), rounded up to a multiple of 64
        ffn = -(-8 * size["hidden"] // 3 // 64) * 64
        return LlamaConfig(vocab_size=vocab, hidden_size=size["hidden"], intermediate_size=ffn,
                           num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                           num_key_value_heads=size["heads"], max_position_embeddings=positions,
                           attention_dropout=dropout, tie_word_embeddings=True,  # as GPT-2: small models gain
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    if architecture == "gpt2":
        return GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=size["hidden"], n_layer=size["layers"],
                          n_head=size["heads"], resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                          # GPT-2's tanh-approximated GELU as one fused kernel (gelu_new is ~8 separate ops)
                          activation_function="gelu_pytorch_tanh",
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    if tokenizer.mask_token_id is None:
        raise LlmkitError("the tokenizer has no mask token, which mlm needs: train one with `llmkit tokenize` "
                          "or pass a BERT-style --tokenizer")
    pad = tokenizer.pad_token_id or 0
    common = dict(vocab_size=vocab, hidden_size=size["hidden"], num_hidden_layers=size["layers"],
                  num_attention_heads=size["heads"], intermediate_size=4 * size["hidden"],
                  hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, pad_token_id=pad)
    if architecture == "roberta":
        # RoBERTa numbers positions from pad_token_id + 1, so its table is that much longer than the block
        return RobertaConfig(max_position_embeddings=positions + pad + 1, type_vocab_size=1,
                             bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id, **common)
    return BertConfig(max_position_embeddings=positions, **common)


def pretrained_model(objective: str, name: str, trust_remote_code: bool = False, **kwargs):
    """A saved model; the weights of a local directory are read from safetensors only (see hub.safetensors_only)."""
    check_model_dir(name)
    kwargs.update(safetensors_only(name))
    load = model_class(objective).from_pretrained
    try:
        model = from_pretrained_or_explain(load, name, "model", trust_remote_code=trust_remote_code,
                                           attn_implementation="sdpa", **kwargs)
    except LlmkitError as e:
        if "sdpa" not in str(e).lower():
            raise
        model = from_pretrained_or_explain(load, name, "model", trust_remote_code=trust_remote_code, **kwargs)
    if objective == "classification":  # llmkit reads a classifier's logits only (finetune, evaluate, classify)
        use_first_token_head(model)
    return model


def check_model_dir(name: str) -> None:
    """A local model directory must hold a config.json; a Hub id is checked when it is loaded."""
    from pathlib import Path

    path = Path(name).expanduser()
    if path.is_file():
        raise LlmkitError(f"{name} is a file, not a model directory: pass the directory that holds it "
                          f"({path.parent})")
    if path.is_dir() and not (path / "config.json").is_file():
        raise LlmkitError(f"{name} is not a model directory (no config.json): pass a directory written by llmkit or "
                          "transformers' save_pretrained, or a Hub id")


def load_config(name: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    check_model_dir(name)
    return from_pretrained_or_explain(AutoConfig.from_pretrained, name, "model", trust_remote_code=trust_remote_code)


def objective_of(name: str, trust_remote_code: bool = False) -> str:
    """clm, mlm or classification, from the architecture a model directory was saved with."""
    config = load_config(name, trust_remote_code)
    arch = (config.architectures or [""])[0]
    if arch.endswith("ForSequenceClassification"):
        return "classification"
    if arch.endswith("ForMaskedLM"):
        return "mlm"
    if arch.endswith(("ForCausalLM", "LMHeadModel")):
        return "clm"
    raise LlmkitError(f"{name} is a {arch or 'bare'} model: llmkit evaluates causal LMs, masked LMs and sequence "
                      "classifiers; fine-tune it first with `llmkit finetune` or `llmkit pretrain`")


def config_positions(name: str, trust_remote_code: bool = False) -> int | None:
    return max_positions(load_config(name, trust_remote_code))


def run_record(name: str) -> dict:
    """llmkit's record of the run that wrote a model directory ({} for other models)."""
    import json
    from pathlib import Path

    path = Path(name).expanduser() / "llmkit_run.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def max_positions(model_or_config) -> int | None:
    """The longest sequence the model takes. RoBERTa-style models number positions from pad_token_id + 1
    (roberta-base: 514 embeddings, 512 tokens)."""
    config = getattr(model_or_config, "config", model_or_config)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx", "max_seq_len"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
                value -= (config.pad_token_id or 0) + 1
            return value
    return None


def check_fit(model, tokenizer, block_size: int | None = None) -> None:
    """The tokenizer's ids and the block size must fit the model's embeddings."""
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise LlmkitError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {vocab}: use "
                          "the model's own tokenizer, or a tokenizer with at most that many tokens")
    check_length(block_size, max_positions(model))


def check_length(length: int | None, positions: int | None, flag: str = "--block-size") -> None:
    """Sequences of `length` tokens (the value of `flag`) must fit the model's `positions`."""
    if length is not None and positions is not None and length > positions:
        raise UsageError(f"{flag} {length} is larger than the model's {positions} positions: use "
                         f"{flag} {positions} or less")


# ---------------------------------------------------------------------------------------------------------------
# Losses


@dataclass
class Masking:
    """BERT masking: select `probability` of the non-special tokens; of those 80% [MASK], 10% random, 10% kept."""

    mask_id: int
    vocab_size: int
    special_ids: torch.Tensor
    probability: float = 0.15
    word_start: torch.Tensor | None = None  # bool per vocabulary id, for whole-word masking

    def __call__(self, input_ids: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        special = torch.isin(input_ids, self.special_ids)
        draw = torch.rand(input_ids.shape, generator=generator)
        if self.word_start is not None:
            # A word is a start token and the continuation tokens after it: all take the start's draw.
            starts = self.word_start[input_ids] | special
            positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
            start_of = torch.where(starts, positions, torch.zeros_like(positions)).cummax(dim=1).values
            draw = draw.gather(1, start_of)
        selected = (draw < self.probability) & ~special
        labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
        action = torch.rand(input_ids.shape, generator=generator)
        masked = input_ids.clone()
        masked[selected & (action < 0.8)] = self.mask_id
        randomise = selected & (action >= 0.8) & (action < 0.9)
        masked[randomise] = torch.randint(self.vocab_size, input_ids.shape, generator=generator)[randomise]
        return masked, labels

    def rows(self, input_ids: torch.Tensor, indices, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask each row with its own generator seeded by (seed, example index): the masks do not depend on how
        examples are split over processes or micro-batches, so runs on 1 or N processes see the same masks."""
        masked_rows, label_rows = [], []
        generator = torch.Generator()
        for row, index in zip(input_ids.cpu(), indices):
            generator.manual_seed(seed * 10_000_019 + int(index))
            masked, labels = self(row[None], generator)
            masked_rows.append(masked)
            label_rows.append(labels)
        return torch.cat(masked_rows), torch.cat(label_rows)


def make_masking(tokenizer, probability: float, whole_word: bool) -> Masking:
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    word_start = None
    if whole_word:
        vocab = [t or "" for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))]
        word_start = torch.tensor(word_starts(vocab), dtype=torch.bool)
    return Masking(tokenizer.mask_token_id, len(tokenizer), special, probability, word_start)


def word_starts(vocab: list[str]) -> list[bool]:
    """Which tokens begin a word, by the vocabulary's convention: WordPiece marks continuations with ##,
    byte-level BPE and SentencePiece mark word starts with Ġ / ▁ (punctuation counts as a start)."""
    if any(t.startswith("##") for t in vocab):
        return [not t.startswith("##") for t in vocab]
    marker = "Ġ" if any(t.startswith("Ġ") for t in vocab) else "▁"
    return [t.startswith((marker, "Ċ")) or not t[:1].isalnum() for t in vocab]


def batch_loss(objective: str, model, batch: dict[str, Any], *, masking: Masking | None = None,
               generator: torch.Generator | None = None, class_weights: torch.Tensor | None = None,
               multi_label: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(summed loss, number of items it covers, logits for classification metrics or None)."""
    if objective == "clm":
        targets = batch["input_ids"][:, 1:]
        hidden, weight = _final_hidden(model, batch["input_ids"])
        if hidden is not None:
            loss = linear_cross_entropy(hidden[:, :-1].reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1))
        else:
            logits = model(input_ids=batch["input_ids"]).logits
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   reduction="sum")
        return loss, torch.tensor(targets.numel(), device=loss.device), None
    if objective == "mlm":
        input_ids, labels = batch.get("masked_ids"), batch.get("mlm_labels")
        if input_ids is None:
            input_ids, labels = masking(batch["input_ids"], generator)
            input_ids, labels = input_ids.to(batch["input_ids"].device), labels.to(batch["input_ids"].device)
        selected = labels != -100
        logits = _masked_logits(model, input_ids, selected)
        loss = F.cross_entropy(logits.float(), labels[selected], reduction="sum")
        return loss, selected.sum(), None
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    logits = model(**inputs).logits
    labels = batch.get("labels")
    if labels is None:
        return torch.zeros((), device=logits.device), torch.tensor(0), logits
    if multi_label:
        loss = F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="sum")
        return loss, torch.tensor(labels.numel(), device=loss.device), logits
    if class_weights is not None:  # built on the CPU from the labels; the logits may be on a GPU
        class_weights = class_weights.to(logits.device)
    loss = F.cross_entropy(logits.float(), labels, weight=class_weights, reduction="none")
    return loss.sum(), torch.tensor(labels.numel(), device=loss.device), logits


def _final_hidden(model, input_ids: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The last hidden states of a causal LM and its output projection, from one forward pass that skips the
    vocabulary projection (`logits_to_keep=1`). The pass goes through `model` itself, so DDP's bookkeeping sees
    it. (None, None) where the model does not fit this path (a biased or non-linear head, no logits_to_keep)."""
    from accelerate.utils import extract_model_from_parallel

    inner = extract_model_from_parallel(model)
    head = inner.get_output_embeddings()
    base = getattr(inner, inner.base_model_prefix, None)
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or base is None or model is not inner \
            and not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return None, None
    captured: list[torch.Tensor] = []

    def keep(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = base.register_forward_hook(keep)
    try:
        model(input_ids=input_ids, logits_to_keep=1)
    except TypeError:  # a model without logits_to_keep
        return None, None
    finally:
        handle.remove()
    return captured[0], head.weight


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of (hidden @ weight.T) against targets, a chunk of rows at a time: the full
    [tokens x vocabulary] logits never exist, and the gradients are computed in the same pass (as in Liger
    Kernel's fused linear cross-entropy). Rows whose target is -100 are ignored."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype, chunk):
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
            grad_hidden = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if needs_grad else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=hidden.device) if needs_grad else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start:start + chunk].to(dtype)
                t = targets[start:start + chunk]
                rows = torch.arange(len(t), device=t.device)
                valid = t != -100
                safe = t.clamp(min=0)
                logits = h @ w.T
                # one pass over the largest tensor of the step: the softmax computes in fp32 and rounds once
                # (under bf16, the logits stay bf16 - no fp32 copy), and it is the gradient but for the target's -1
                probs = torch.softmax(logits, dim=-1)
                # loss = logsumexp - target logit = -log p(target): within the rounding of p (2^-9 relative under
                # bf16, i.e. 0.002 in the loss), finer than the rounding of the logits themselves
                target_prob = probs[rows, safe].float()
                losses = -target_prob.log()
                lost = valid & (target_prob < torch.finfo(dtype).tiny)  # p underflowed: that row from its logits
                if lost.any():
                    exact = logits[lost].float()
                    losses[lost] = exact.logsumexp(dim=-1) - exact.gather(1, safe[lost][:, None]).squeeze(1)
                total += losses.masked_fill(~valid, 0).sum()
                if needs_grad:
                    probs[rows, safe] -= valid.to(dtype)
                    if not valid.all():
                        probs[~valid] = 0
                    grad_hidden[start:start + chunk] = probs @ w
                    grad_weight += (probs.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.hidden_dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return ((grad_hidden * grad_output).to(ctx.hidden_dtype), grad_weight * grad_output, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    # ~256 MB of fp32 logits per chunk: GEMMs of a few thousand rows run near peak, smaller chunks pay for
    # their overhead (measured on 2 CPU cores: 512 rows cost 1.7x one chunk of 4,096 for vocabulary 8,192)
    chunk = chunk or max(256, (1 << 26) // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets, dtype, chunk)


def _masked_lm_parts(model) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
    """A masked LM's base model and vocabulary head, which _masked_logits calls apart (None where it has none)."""
    return (getattr(model, model.base_model_prefix, None),
            getattr(model, "cls", None) or getattr(model, "lm_head", None))


def _masked_logits(model, input_ids: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits at the selected positions only: the loss is the same as from all positions, and the
    output projection - the largest matrix product of a small masked LM - runs on ~15% of the tokens."""
    base, head = _masked_lm_parts(model)
    attention_mask = torch.ones_like(input_ids)
    if head is not None and base is not None:
        hidden = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return head(hidden[selected])
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[selected]



def _random_words(n: int, device: torch.device) -> torch.Tensor:
    """n uniform 64-bit words (int64). On a CPU they come from numpy's SFC64, seeded by one draw of the global torch
    generator - seeded and resumed runs repeat, as the torch generator decides everything - because PyTorch's CPU
    generator (a Mersenne Twister, one thread) fills them ~3.7x slower; elsewhere from the device's generator."""
    if device.type != "cpu":  # from -2^63 with no upper bound: all 64 bits (plain random_() leaves the sign at 0)
        return torch.empty(n, dtype=torch.int64, device=device).random_(-(1 << 63), None)
    import numpy as np

    seed = int(torch.empty((), dtype=torch.int64).random_())
    return torch.from_numpy(np.random.SFC64(seed).random_raw(n).view(np.int64))


def _dropout_draws(x: torch.Tensor, p: float) -> tuple[torch.Tensor, int]:
    """x.numel() uniform 16-bit draws (int16) in x's shape, four from each 64-bit random word, and the threshold
    at or above which an element is kept: with probability 1 - p, to 1/65,536. The threshold stays within int16
    (at p near 1, 32768 would wrap around and keep everything)."""
    n = x.numel()
    draws = _random_words((n + 3) // 4, x.device).view(torch.int16)[:n].view(x.shape)
    return draws, min(round(p * 65536), 65535) - 32768


def _dropout_keep(x: torch.Tensor, p: float) -> torch.Tensor:
    """A boolean mask of x's shape, True with probability 1 - p (to 1/65,536), from _dropout_draws: a 64-bit word
    per four elements, where bernoulli_ draws once per element (~8x dearer on a CPU)."""
    draws, threshold = _dropout_draws(x, p)
    return draws >= threshold


def _dropout_scale(x: torch.Tensor, p: float, scale: float = 1.0) -> torch.Tensor:
    """`scale` where _dropout_keep keeps (the same draws, the same mask), 0 elsewhere, in x's shape and dtype. For
    fp32 and bf16 on a CPU, numpy compares the draws and writes the factors (bf16 as the 16-bit pattern of the
    rounded scale), faster than PyTorch's CPU compare and bool-to-float (benchmarks/micro.py, forward and backward:
    a 32 x 15 x 384 fp32 dropout 0.84-1.12 -> 0.69-0.70 ms on an Emerald Rapids VM; CLM's 16 x 6 x 256 x 256 bf16
    attention dropout 11.8-17.0 -> 8.4-12.4 ms on a Zen 4 VM, where the fp32 shapes came out within noise); the
    factors are the same floats either way."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        keep = _dropout_keep(x, p).to(x.dtype)
        return keep if scale == 1 else keep * scale
    import numpy as np

    draws, threshold = _dropout_draws(x, p)
    if x.dtype == torch.float32:
        factor, stored = np.float32(scale), np.float32
    else:  # numpy has no bf16: the factors as int16 bit patterns of bf16(scale), viewed back as bf16
        factor, stored = np.int16(torch.tensor(scale, dtype=torch.bfloat16).view(torch.int16).item()), np.int16
    return torch.from_numpy(np.multiply(draws.numpy() >= threshold, factor, dtype=stored)).view(x.dtype)


class FastDropout(torch.nn.Module):
    """Dropout as nn.Dropout computes it (zero each element with probability p, scale the rest by 1/(1-p)), with
    the cheaper random source of _dropout_keep, seeded from the global torch generator: seeded and resumed runs
    stay exact. Under torch.compile it is nn.Dropout's own: the compiler fuses its random draws into the kernel
    around them, and numpy's draws would break the graph."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if torch.compiler.is_compiling():
            return torch.nn.functional.dropout(x, self.p, training=True)
        if self.p >= 1:
            return x * 0
        return x * _dropout_scale(x, self.p, 1 / (1 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


# The tanh-approximated GELU (GPT-2's), 0.5 x (1 + tanh(c (x + 0.044715 x^3))) with c = sqrt(2 / pi), is the same
# function as x * sigmoid(x (2c + 2c * 0.044715 x^2)), since (1 + tanh(z)) / 2 = sigmoid(2 z).
_GELU_LINEAR = 2 * (2 / torch.pi) ** 0.5
_GELU_CUBIC = _GELU_LINEAR * 0.044715
# Elements per pass of FastGeluTanh: each pass's fp32 buffers (4 MB each) stay in the cache between its operations.
# Forward over [16, 256, 1536] bf16 (a Zen 4 VM, medians of 30): chunks of 2^18 4.16, 2^19 3.64, 2^20 3.34, 2^21 3.56 ms.
GELU_CHUNK = 1 << 20
# Below this many elements PyTorch's kernel is as fast (2^16: 0.068 against 0.080 ms in bf16; 2^18: 0.26 against 0.19).
GELU_MIN = 1 << 17


def _gelu_tanh_forward(x: torch.Tensor) -> torch.Tensor:
    """The tanh GELU of a contiguous fp32 or bf16 CPU tensor in its sigmoid form, computed in fp32 a chunk at a
    time and rounded once to x's dtype. PyTorch's fused kernel computes tanh with a precise SLEEF routine that is
    ~6x dearer than its sigmoid (fp32, 6.3 M elements: 8.4 against 1.3 ms); these eight cheap passes (six for fp32)
    over a cached chunk take ~55 % of its time, with the same largest error against float64 (bf16: 0.0078; for
    normally distributed inputs a bf16 result differs from PyTorch's in ~1 element in 12,000, by one rounding step,
    and in the far negative tail, where 1 + tanh cancels, more often, and mostly nearer the exact value)."""
    out = torch.empty_like(x)
    flat, dest = x.view(-1), out.view(-1)
    size = min(GELU_CHUNK, flat.numel())
    work = torch.empty(size, dtype=torch.float32, device=x.device)
    upcast = torch.empty(size, dtype=torch.float32, device=x.device) if x.dtype != torch.float32 else None
    for start in range(0, flat.numel(), size):
        part = flat[start:start + size]
        n = part.numel()
        value = part if upcast is None else upcast[:n].copy_(part)
        inner = torch.mul(value, value, out=work[:n])
        inner.mul_(_GELU_CUBIC).add_(_GELU_LINEAR).mul_(value)
        gate = torch.sigmoid(inner, out=inner)
        if upcast is None:
            torch.mul(gate, value, out=dest[start:start + n])
        else:  # two passes (multiply in fp32, then round) beat one mixed-dtype multiply: 3.3 against 3.8 ms above
            dest[start:start + n].copy_(gate.mul_(value))
    return out


class _GeluTanh(torch.autograd.Function):
    """Forward by _gelu_tanh_forward; backward by PyTorch's own tanh-GELU derivative (a faster one from the same
    cheap passes was not: 6.5-7.0 against 6.1 ms above)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _gelu_tanh_forward(x)

    @staticmethod
    def backward(ctx, grad_output):
        x, = ctx.saved_tensors
        return torch.ops.aten.gelu_backward(grad_output.contiguous(), x, approximate="tanh")


class FastGeluTanh(torch.nn.Module):
    """The tanh-approximated GELU (transformers' gelu_pytorch_tanh, gelu_new, gelu_fast, ...), with the forward pass of
    _gelu_tanh_forward for large contiguous fp32 and bf16 CPU tensors; anything else (small tensors, other dtypes
    and devices, a model being compiled, whose compiler fuses the activation itself) takes PyTorch's kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or x.numel() < GELU_MIN \
                or not x.is_contiguous() or torch.compiler.is_compiling():
            return F.gelu(x, approximate="tanh")
        return _GeluTanh.apply(x)


FAST_ATTENTION = "llmkit_cpu"


# The longest key length at which a bf16 training step's attention without dropout takes llmkit's path instead of
# SDPA's fused kernel, whose backward pass is slow at short lengths on a CPU. Forward + backward of one layer's
# attention, SDPA against llmkit's path (benchmarks/micro.py --repeats 20, a Zen 4 VM with AVX-512 BF16): in bf16,
# fine-tuning's 32 x 12 heads x 15 tokens with a padding mask 14.4 against 2.3 ms, MLM's 32 x 4 x 128 33.1 against
# 10.6, CLM's 16 x 6 x 256 causal 51.6 against 24.5. Beyond 256 the gain shrinks while llmkit's path keeps every
# layer's probabilities for the backward pass (batch x heads x length^2, which SDPA's fused kernel does not): at 512,
# 8 x 12 heads causal 172 against 142 ms, at 1,024 SDPA is ahead (195 against 273), and in fp32 SDPA is even or
# ahead at every length (162 against 262 at 512).
MANUAL_BF16_MAX_LENGTH = 256


def _cpu_training_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention interface, for training on a CPU. With attention dropout, PyTorch's SDPA cannot use
    its fused kernel (it takes no dropout) and falls back to a math path that upcasts q, k and v to fp32 and draws
    dropout with bernoulli_; without dropout, in bf16, its fused kernel's backward pass is slow at short lengths (up
    to MANUAL_BF16_MAX_LENGTH keys). This computes the same attention - softmax(q k^T * scale + mask), dropout on the
    probabilities, times v - with _dropout_keep's random source and its products in the input precision (the
    softmax computes in fp32 and rounds once): under bf16 autocast, the forward numerics of transformers' eager
    attention up to where the causal path rounds the scaled product, and a backward pass that uses the rounded
    probabilities. Anything else (evaluation, fp32 without dropout, longer bf16 sequences without dropout, another
    device, a cache longer than the queries, extra features, a model being compiled, whose compiler fuses SDPA's
    dropout itself) goes to SDPA unchanged. The choice follows the module's training flag, not the grad mode, so
    that gradient checkpointing recomputes the forward pass on the path that first computed it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    length = key.shape[-2]
    slow_sdpa = getattr(module, "training", False) and _attention_dtype(query) == torch.bfloat16 \
        and length <= MANUAL_BF16_MAX_LENGTH
    if not (dropout or slow_sdpa) or query.device.type != "cpu" or query.shape[-2] != length \
            or torch.compiler.is_compiling() \
            or any(kwargs.get(k) is not None for k in ("position_bias", "softcap", "sliding_window")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    return _manual_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal)


def _manual_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None) -> tuple[torch.Tensor, None]:
    """_cpu_training_attention's own computation (query and key of the same length), as the attention interface
    returns it: (batch, queries, heads, head size), None."""
    from transformers.integrations.sdpa_attention import repeat_kv

    dtype = _attention_dtype(query)
    length = key.shape[-2]
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    lowest = torch.finfo(torch.float32 if dtype == torch.float64 else dtype).min  # finite in fp32
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    future = torch.ones(length, length, dtype=torch.bool, device=query.device).triu(1) \
        if attention_mask is None and causal and length > 1 else None
    if future is not None and key.shape[:-2] == query.shape[:-2]:
        # the causal mask as an additive bias inside the batched product, scaled there too (before rounding:
        # the same as scaling after it for power-of-two scales such as 1/8): no pass of its own, and nothing
        # to mask in the backward pass (the softmax's gradient is zero where it gives zero)
        bias = torch.zeros(length, length, dtype=dtype, device=query.device).masked_fill_(future, lowest)
        batch = query.shape[:-2]
        scores = torch.baddbmm(bias, query.reshape(-1, length, query.shape[-1]).to(dtype),
                               key.reshape(-1, length, key.shape[-1]).to(dtype).transpose(1, 2), alpha=scaling)
        scores = scores.view(*batch, length, length)
    else:
        scores = torch.matmul(query * scaling, key.transpose(-1, -2))
        if future is not None:  # key/value heads the model broadcasts itself
            scores = scores.masked_fill(future, lowest)
        elif attention_mask is not None and attention_mask.dtype == torch.bool:  # True: may attend (as in SDPA)
            scores = scores.masked_fill(~attention_mask[..., :length], lowest)
        elif attention_mask is not None:  # additive
            scores = scores + attention_mask[..., :length].to(scores.dtype)
    probs = _softmax(scores)
    if dropout:
        probs = probs * _dropout_scale(probs, dropout)
        out = torch.matmul(probs, value) * (1 / (1 - dropout))  # the dropout scale, on the smaller tensor
    else:
        out = torch.matmul(probs, value)
    return out.transpose(1, 2).contiguous(), None


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension (keys) of fp32 or bf16 scores, rounded once to their dtype. PyTorch's CPU
    softmax runs each row by whole vectors (16 fp32 or 32 bf16 values under AVX-512) and the rest of the row element
    by element, so short rows - fine-tuning's sentences - run mostly element by element, at a cost that grows with
    that rest. Here bf16 rows of 10 to 31 keys are computed in fp32, and rows of fewer than 16 keys (from 8 in fp32,
    10 in bf16) are first padded to 16 with -inf, which weighs nothing: a row masked whole with the finite lowest
    value still spreads over its real keys only. Forward + backward over 32 x 12 heads (benchmarks/micro.py, a Zen 4
    VM with AVX-512, three runs): bf16 at 12 keys 0.51-0.52 -> 0.28-0.31 ms, 15 keys 0.76-0.77 -> 0.32-0.35, 24 keys
    1.24-1.48 -> 0.36-0.59; fp32 at 8 keys 0.36-0.43 -> 0.26-0.29, 15 keys 1.09-1.12 -> 0.27-0.28. Shorter rows (bf16
    at 4 and 8 keys 0.09-0.10 and 0.23-0.27 ms as they are, 0.24 and 0.34-0.36 padded) and bf16 rows from 32 keys
    on keep PyTorch's softmax, as other dtypes and devices do: there the fp32 pass was ahead in one run of three (40
    keys 1.08 -> 0.73), even in the others, and slower at 72-80 keys. Where the fp32 pass runs, the backward pass
    works from the fp32 probabilities (autograd keeps them beside the rounded ones: batch x heads x queries x 16-31
    keys) rather than from the rounded ones as PyTorch's bf16 softmax does: gradients that differ from its by bf16
    rounding, nearer the exact ones."""
    keys, dtype = scores.shape[-1], scores.dtype
    short = 8 <= keys < 16 if dtype == torch.float32 else dtype == torch.bfloat16 and 10 <= keys < 32
    if not short or scores.device.type != "cpu":
        return torch.softmax(scores, dim=-1)  # on a CPU, bf16 softmax computes in fp32 and rounds once at the end
    if keys >= 16:
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
    padded = torch.nn.functional.pad(scores, (0, 16 - keys), value=float("-inf"))
    # contiguous: an fp32 slice would otherwise stay a view with rows 16 apart (.to copies bf16 anyway)
    return torch.softmax(padded, dim=-1, dtype=torch.float32)[..., :keys].to(dtype).contiguous()


def _attention_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype a CPU attention computes its products in: autocast's for fp32 inputs (autocast casts fp32 only),
    else the inputs' own."""
    autocast = torch.is_autocast_enabled("cpu") and query.dtype == torch.float32
    return torch.get_autocast_dtype("cpu") if autocast else query.dtype


def use_fast_attention(model: torch.nn.Module) -> bool:
    """Route the attention of a model that uses SDPA through _cpu_training_attention (CPU training only; the
    saved config keeps "sdpa"). Returns whether it did."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
    except ImportError:  # transformers before 4.53: keep SDPA
        return False
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if FAST_ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(FAST_ATTENTION, _cpu_training_attention)
        AttentionMaskInterface.register(FAST_ATTENTION, sdpa_mask)
    config._attn_implementation = FAST_ATTENTION
    return True


def _swap_children(model: torch.nn.Module, replacement: Callable[[torch.nn.Module], torch.nn.Module | None]) -> int:
    """Replace each submodule for which `replacement` returns a module; returns how many."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in module.named_children():
            new = replacement(child)
            if new is not None:
                setattr(module, name, new)
                swapped += 1
    return swapped


def use_fast_dropout(model: torch.nn.Module) -> int:
    """Swap the model's nn.Dropout modules for FastDropout (same p; no parameters, so saved models are
    unchanged); returns how many. For CPUs: on GPUs nn.Dropout is already a fused kernel."""
    return _swap_children(model, lambda child: FastDropout(child.p) if type(child) is torch.nn.Dropout else None)


def use_fast_gelu(model: torch.nn.Module) -> int:
    """Swap the model's tanh-approximated GELU modules (transformers' gelu_pytorch_tanh, gelu_python_tanh,
    gelu_new, gelu_fast and gelu_accurate: the same function written several ways) for FastGeluTanh; returns how
    many. For CPUs, as use_fast_dropout: no parameters, so saved models and their configs are unchanged. The exact
    classes only: a subclass (remote code) may compute something else."""
    from transformers import activations

    names = ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "FastGELUActivation",  # PytorchGELUTanh: before 5
             "AccurateGELUActivation")
    tanh_gelus = tuple(getattr(activations, name) for name in names if hasattr(activations, name))
    return _swap_children(model, lambda child: FastGeluTanh() if type(child) in tanh_gelus else None)


def compile_for_training(model: torch.nn.Module, objective: str) -> None:
    """torch.compile, in place, the modules a training step calls: the model itself, and for a masked LM the
    base model and the head that _masked_logits calls apart. In place (nn.Module.compile), the model keeps its
    class, attributes and state-dict keys, so the paths that reach into it (the fused causal-LM loss, the
    masked-logits head, DDP, saving) see the model they expect, now running compiled."""
    model.compile()
    base, head = _masked_lm_parts(model)
    if objective == "mlm" and base is not None and head is not None:  # as _masked_logits calls them
        base.compile()
        head.compile()


# transformers' sequence classifiers whose head reads the first token's final hidden state only (BertPooler,
# RoBERTa's and ELECTRA's classification heads: hidden[:, 0]), with BERT's encoder layer (attention.self.query/
# key/value, attention.output, intermediate, output), which returns a tensor from transformers 5 on.
FIRST_TOKEN_CLASSIFIERS = ("bert", "roberta", "xlm-roberta", "camembert", "electra")


def use_first_token_head(model: torch.nn.Module) -> bool:
    """Compute the last encoder layer of a first-token sequence classifier at the first position only: its keys
    and values still come from every position, but its query, attention output and feed-forward block - 5/6 of
    the layer's products - run on one token instead of all, and nothing else reads the other positions. Logits,
    loss and gradients are those of the whole layer (fine-tuning MiniLM-L6 on SST-2, one layer of six: ~13 % more
    samples/s in fp32). The model's last_hidden_state then holds that position only. Returns whether it did."""
    import transformers

    config = getattr(model, "config", None)
    base = getattr(model, "base_model", None)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    own_class = type(model).__module__.startswith("transformers.models.")  # not remote code with its own head
    if config is None or getattr(config, "model_type", None) not in FIRST_TOKEN_CLASSIFIERS or not own_class \
            or int(transformers.__version__.split(".")[0]) < 5 \
            or not type(model).__name__.endswith("ForSequenceClassification") or not layers \
            or getattr(config, "is_decoder", False) or getattr(config, "chunk_size_feed_forward", 0) \
            or getattr(config, "position_embedding_type", "absolute") != "absolute":
        return False
    last = layers[-1]
    attention = getattr(getattr(last, "attention", None), "self", None)
    if attention is None or not all(hasattr(attention, n) for n in ("query", "key", "value", "scaling")) \
            or not all(hasattr(last, n) for n in ("intermediate", "output")):
        return False
    import types

    # bound to the layer (no closure over it): a deep copy of the model binds the copy's own layer
    last.forward = types.MethodType(_first_position_forward, last)
    return True


def _first_position_forward(layer, hidden_states, attention_mask=None, *args, **kwargs):
    if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
        import functools

        # as transformers' GradientCheckpointingLayer wraps its class's forward (this one replaces it)
        return layer._gradient_checkpointing_func(functools.partial(_first_position, layer, **kwargs), hidden_states,
                                                  attention_mask, *args)
    return _first_position(layer, hidden_states, attention_mask, *args, **kwargs)


def _first_position(layer, hidden_states, attention_mask=None, *args, **kwargs):
    out = _first_position_layer(layer, hidden_states, attention_mask, kwargs)
    if out is None:  # the whole layer, as its class computes it (unwrapped: the caller checkpoints)
        whole = type(layer).forward
        out = getattr(whole, "__wrapped__", whole)(layer, hidden_states, attention_mask, *args, **kwargs)[:, :1]
    return out


def _first_position_layer(layer, hidden_states, mask, kwargs) -> torch.Tensor | None:
    """BERT's encoder layer for the first position's query (None where this layer call does not fit: a cache, an
    attention implementation other than SDPA / eager / llmkit's, a mask that is not [batch, 1, queries, keys])."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attention = layer.attention.self
    impl = attention.config._attn_implementation
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None or impl not in (
            "sdpa", "eager", FAST_ATTENTION) or mask is not None and mask.dim() != 4:
        return None
    if impl == "eager":
        import sys

        attend = getattr(sys.modules[type(attention).__module__], "eager_attention_forward", None)
        if attend is None:
            return None
    else:
        attend = ALL_ATTENTION_FUNCTIONS[impl]
    batch, head_size = hidden_states.shape[0], attention.attention_head_size
    first = hidden_states[:, :1]
    query = attention.query(first).view(batch, 1, -1, head_size).transpose(1, 2)
    key = attention.key(hidden_states).view(batch, hidden_states.shape[1], -1, head_size).transpose(1, 2)
    value = attention.value(hidden_states).view(batch, hidden_states.shape[1], -1, head_size).transpose(1, 2)
    context, _ = attend(attention, query, key, value, None if mask is None else mask[:, :, :1],
                        dropout=attention.dropout.p if attention.training else 0.0, scaling=attention.scaling)
    attended = layer.attention.output(context.reshape(batch, 1, -1), first)
    return layer.output(layer.intermediate(attended), attended)
