"""Inference: classify texts (batched, length-sorted, dynamically padded), generate text, fill masks."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, TextIO

from llmkit.errors import LlmkitError, UsageError


def read_texts(texts: list[str], file: str | None, text_column: str | None, stdin: TextIO) -> list[str]:
    """Texts from the arguments (`-` = one per line from stdin) and/or a .txt/.csv/.tsv/.json(l)/.parquet file."""
    from llmkit import sources as src

    out: list[str] = []
    for number, text in enumerate(texts, start=1):
        if text == "-":
            out.extend(_stdin_lines(stdin))
        else:
            out.append(_checked_argument(text, number))
    if file is not None:
        path = Path(file).expanduser()
        if not path.is_file():
            raise UsageError(f"--file {file} does not exist: check the path")
        source = src.resolve([str(path)], "--file")[0]
        if src.BUILDERS[path.suffix.lower()] == "text":
            out.extend(line for chunk in src.read_text_chunks(path) for line in chunk.split("\n") if line.strip())
        else:
            table = src.read_file_table(source)
            column = src.pick_column(table.column_names, text_column, src.TEXT_COLUMNS, "text", "--text-column",
                                     file)
            out.extend(map(src.cell_text, _cells(table, column)))
    if not out and not texts and file is None:
        raise UsageError('nothing to classify: give texts (llmkit classify "some text" --model DIR), --file FILE, '
                         "or - to read stdin")
    return out


def _cells(table, column: str) -> list:
    """A column's values as Python objects, from a pyarrow Table or a datasets.Dataset."""
    values = table[column]
    return values.to_pylist() if hasattr(values, "to_pylist") else list(values)


def _checked_argument(text: str, number: int) -> str:
    """A text argument as given. Python decodes command-line bytes that are not UTF-8 into lone surrogates,
    which the tokenizer and JSON cannot take: name the argument instead."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        raise LlmkitError(f"text argument {number} ({shown[:40]!r}) is not valid UTF-8: give it as UTF-8 text (set "
                          "the terminal to UTF-8, or convert the text)") from None
    return text


def _stdin_lines(stdin: TextIO) -> Iterable[str]:
    raw = getattr(stdin, "buffer", None)
    if raw is None:  # a text stream that is already decoded (tests, pipes set up in Python)
        yield from (line.rstrip("\n") for line in stdin)
        return
    for number, line in enumerate(raw, start=1):
        try:
            yield line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise LlmkitError(f"stdin, line {number}: not valid UTF-8 text; convert the input to UTF-8") from None


def _autocast(precision: str, device):
    import contextlib

    import torch

    from llmkit.train import resolve_precision

    resolved = resolve_precision(precision, device)
    if resolved == "fp32":
        return contextlib.nullcontext(), resolved
    dtype = torch.bfloat16 if resolved == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype), resolved


class Classifier:
    """A fine-tuned sequence classifier, ready to label texts."""

    def __init__(self, model: str, precision: str = "auto", max_length: int | None = None, device: str | None = None):
        import numpy as np
        import torch

        from llmkit import tasks
        from llmkit.evaluation import saved_thresholds
        from llmkit.tokenizer import load_tokenizer

        if tasks.objective_of(model) != "classification":
            raise LlmkitError(f"{model} is not a classifier (it is a {tasks.objective_of(model)} model): fine-tune it "
                              "with `llmkit finetune` first, or pass a classifier directory")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = load_tokenizer(model)
        self.model = tasks.pretrained_model("classification", model).to(self.device).eval()
        config = self.model.config
        self.names = [config.id2label[i] for i in range(config.num_labels)]
        self.multi_label = config.problem_type == "multi_label_classification"
        self.thresholds = np.asarray(saved_thresholds(config, self.names))
        positions = tasks.max_positions(self.model)
        tasks.check_length(max_length, positions, "--max-length")
        limit = positions or 512
        self.max_length = min(max_length or limit, limit, self.tokenizer.model_max_length or limit)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else \
            (config.pad_token_id or 0)
        self.precision = precision

    def __call__(self, texts: list[str], top_k: int = 1, batch_size: int = 64) -> list[dict[str, Any]]:
        import numpy as np
        import torch

        if not texts:
            return []
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=False,
                                 return_attention_mask=False)["input_ids"]
        filler = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.pad_id
        encoded = [ids or [filler] for ids in encoded]  # an empty text still gets a prediction
        full = self.tokenizer(texts, truncation=False, padding=False, return_attention_mask=False,
                              return_length=True)["length"] if any(len(e) >= self.max_length for e in encoded) \
            else [len(e) for e in encoded]
        lengths = np.array([len(e) for e in encoded])
        order = np.argsort(-lengths, kind="stable")
        probs = np.zeros((len(texts), len(self.names)), dtype=np.float32)
        autocast, _ = _autocast(self.precision, self.device)
        with torch.inference_mode(), autocast:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                width = int(lengths[idx].max())
                ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    ids[row, : lengths[i]] = torch.tensor(encoded[i])
                    mask[row, : lengths[i]] = 1
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits.float()
                p = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
                probs[idx] = p.cpu().numpy()
        results = []
        k = min(top_k, len(self.names))
        for i, text in enumerate(texts):
            ranked = np.argsort(-probs[i], kind="stable")[:k]
            entry: dict[str, Any] = {"text": text, "label": self.names[ranked[0]], "score": float(probs[i, ranked[0]])}
            if self.multi_label:
                entry["labels"] = [self.names[j] for j in np.flatnonzero(probs[i] >= self.thresholds)]
            if k > 1:
                entry["top_k"] = [{"label": self.names[j], "score": float(probs[i, j])} for j in ranked]
            entry["truncated"] = bool(full[i] > self.max_length)
            results.append(entry)
        return results


# ---------------------------------------------------------------------------------------------------------------
# generate and fill

MASK_PLACEHOLDER = "{mask}"  # what model cards and examples write, whatever the model's own mask token is
KINDS = {"clm": "a causal (GPT-style) language model", "mlm": "a masked (BERT-style) language model",
         "classification": "a classifier"}
USES = {"clm": "llmkit generate", "mlm": "llmkit fill", "classification": "llmkit classify"}


def _language_model(model: str, objective: str):
    """(model in eval mode on the best device, tokenizer, device) of a model trained for `objective`."""
    import torch

    from llmkit import tasks
    from llmkit.tokenizer import load_tokenizer

    found = tasks.objective_of(model)
    if found != objective:
        raise LlmkitError(f"{model} is {KINDS[found]}, not {KINDS[objective]}: use `{USES[found]}` with it, or "
                          f"pass {KINDS[objective]} (`llmkit pretrain --objective {objective}` trains one)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return tasks.pretrained_model(objective, model).to(device).eval(), load_tokenizer(model), device


def generate_texts(model: str, prompts: list[str], *, max_new_tokens: int = 50, temperature: float = 1.0,
                   top_k: int = 50, top_p: float = 1.0, num_return_sequences: int = 1,
                   seed: int | None = None) -> list[dict[str, Any]]:
    """Continuations of each prompt by a causal LM with transformers' `generate`. Every prompt is sampled from
    the same seed, so a prompt's texts depend only on (prompt, settings, seed), not on the other prompts."""
    import random

    import torch

    from llmkit import tasks

    if temperature == 0 and num_return_sequences > 1:
        raise UsageError("--num-return-sequences above 1 needs sampling: greedy decoding (--temperature 0) gives "
                         "one text per prompt; set --temperature above 0")
    lm, tokenizer, device = _language_model(model, "clm")
    positions = tasks.max_positions(lm)
    if positions is not None and max_new_tokens >= positions:
        raise UsageError(f"--max-new-tokens {max_new_tokens} leaves no room for the prompt in the model's "
                         f"{positions} positions: use --max-new-tokens {positions - 1} or less")
    seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    sampling = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p) if temperature > 0 \
        else dict(do_sample=False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results = []
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        if not ids:  # an empty prompt: start a fresh document, as after a document separator in training
            start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            if start is None:
                raise UsageError("the prompt is empty and the tokenizer has no bos or eos token to start from: "
                                 "give a prompt")
            ids = [start]
        room = positions - max_new_tokens if positions is not None else len(ids)
        truncated = len(ids) > room
        ids = ids[-room:]  # a long prompt keeps its end, which is what the continuation follows
        torch.manual_seed(seed)
        with torch.inference_mode():
            input_ids = torch.tensor([ids], device=device)
            output = lm.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences,
                                 pad_token_id=pad_id, **sampling)
        # Decode prompt and continuation together and cut the prompt's text off: a token that merges across
        # the boundary (a WordPiece `##` piece, a split UTF-8 character) then decodes as it should.
        shown_prompt = tokenizer.decode(ids, skip_special_tokens=True)
        completions = [tokenizer.decode(row, skip_special_tokens=True)[len(shown_prompt):] for row in output]
        results.append({"prompt": prompt, "completions": completions, "seed": seed, "truncated": truncated})
    return results


def fill_masks(model: str, texts: list[str], top_k: int = 5) -> list[dict[str, Any]]:
    """The top_k tokens a masked LM predicts for each mask of each text (`{mask}` or the model's mask token)."""
    import torch

    from llmkit import tasks

    lm, tokenizer, device = _language_model(model, "mlm")
    mask = tokenizer.mask_token
    if mask is None:
        raise LlmkitError(f"the tokenizer of {model} has no mask token: pass a model trained with masked-language "
                          "modelling (`llmkit pretrain --objective mlm`)")
    positions = tasks.max_positions(lm)
    # Special tokens ([PAD], [CLS], [SEP], [UNK]) are never an answer to "which word goes here": they are left out
    # of the ranking, and the scores stay the model's probabilities over its whole vocabulary.
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    k = min(top_k, len(tokenizer) - len(special))
    results = []
    for text in texts:
        marked = text.replace(MASK_PLACEHOLDER, mask)
        ids = tokenizer(marked)["input_ids"]
        where = [i for i, token in enumerate(ids) if token == tokenizer.mask_token_id]
        if not where:
            raise UsageError(f"no mask in {text!r}: write {MASK_PLACEHOLDER} (or {mask}) where a word is missing, "
                             f'as in llmkit fill "The {MASK_PLACEHOLDER} is bright." --model DIR')
        if positions is not None and len(ids) > positions:
            raise UsageError(f"{text[:40]!r}... is {len(ids)} tokens, more than the model's {positions} positions: "
                             "shorten it")
        with torch.inference_mode():
            input_ids = torch.tensor([ids], device=device)
            logits = lm(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits[0, where]
        probs = torch.softmax(logits.float(), dim=-1).cpu()
        probs[:, special] = 0.0
        top = probs.topk(k, dim=-1)
        masks = [[{"token": tokenizer.decode([int(i)]).strip(), "score": float(p)} for p, i in zip(scores, token_ids)]
                 for scores, token_ids in zip(top.values, top.indices)]
        filled = marked
        for ranked in masks:
            filled = filled.replace(mask, ranked[0]["token"], 1)
        results.append({"text": text, "filled": filled, "masks": masks})
    return results
