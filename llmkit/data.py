"""The one dataset pipeline: raw data -> token ids -> cached Arrow -> packed blocks or labeled examples.

Language modelling: documents are encoded with the fast tokenizer's batch encoder, each followed by the
separator token (eos, or sep for BERT-style vocabularies), and written as one Arrow row per document. The
token stream of that file *is* the packed corpus: a block of any size is a slice of it, read through a
memory map, so packing costs nothing, wastes no token to padding and re-packing for another block size
needs no re-tokenizing.

Classification: texts are encoded with truncation (no padding: batches are padded dynamically), labels are
mapped to ids; the result is an Arrow dataset.

Both are cached under a content-addressed key (file contents, tokenizer, settings), so the same inputs are
tokenized once, whichever command asks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from llmkit import display
from llmkit import sources as src
from llmkit.errors import LlmkitError, UsageError
from llmkit.tokenizer import fingerprint, separator_id, untruncated

CACHE_VERSION = 3  # 2: .csv/.tsv cells such as "NA" or "null" stay text (sources.PANDAS_CELLS); 3: and "007"
VALIDATION_SEED = 1234  # fixed, so that the held-out part is the same whatever the training seed
PART = 2048  # texts per call of a batch encoder: large enough for its threads, small enough to show progress


def cache_root(cache_dir: str | None = None) -> Path:
    root = cache_dir or os.environ.get("LLMKIT_CACHE") or Path.home() / ".cache" / "llmkit"
    return Path(root).expanduser()


def cache_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps({"v": CACHE_VERSION, **parts}, sort_keys=True).encode()).hexdigest()[:24]


@contextlib.contextmanager
def building(final: Path) -> Iterator[Path]:
    """Build into a temporary sibling and rename it into place: a reader never sees half a cache entry."""
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if final.exists():  # another process finished the same entry first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------------------------
# Language modelling


@dataclass
class TokenizedCorpus:
    """A directory with train.arrow (and validation.arrow) of per-document token ids, and a summary."""

    path: Path
    info: dict
    eval_corpus: "TokenizedCorpus | None" = None  # held-out text tokenized separately

    def stream(self, split: str = "train") -> "TokenStream":
        return TokenStream(self.path / f"{split}.arrow")

    def validation_stream(self) -> "TokenStream | None":
        if self.eval_corpus is not None:
            return self.eval_corpus.stream("train")
        if (self.path / "validation.arrow").is_file() and self.info.get("validation_tokens", 0) > 0:
            return self.stream("validation")
        return None


def tokenize_corpus(data: list[str], tokenizer, *, eval_data: list[str] | None = None,
                    validation_split: float = 0.0, text_column: str | None = None, sample_by: str = "paragraph",
                    max_samples: int | None = None, cache_dir: str | None = None, output: Path | None = None,
                    trust_remote_code: bool = False, flag: str = "--data") -> TokenizedCorpus:
    """Tokenize documents into the cache (or `output`), or return the cached result for the same inputs. `flag`
    names `data` in errors (evaluate scores --eval-data through it)."""
    train_sources = src.resolve(data, flag)
    eval_sources = src.resolve(eval_data or [], "--eval-data")
    tokenized = [s for s in train_sources if s.kind == "tokenized"]
    if tokenized:
        if len(train_sources) > 1:
            raise UsageError("pre-tokenized data (an `llmkit tokenize` output) cannot be combined with other "
                             "--data sources: give it alone")
        corpus = TokenizedCorpus(Path(tokenized[0].name), src.read_json(Path(tokenized[0].name)
                                                                        / src.TOKENIZED_MARKER))
        if corpus.info["tokenizer"] != fingerprint(tokenizer):
            raise UsageError(f"{tokenized[0].name} was tokenized with another tokenizer: pass that tokenizer "
                             f"(--tokenizer {Path(tokenized[0].name).parent}) or re-run `llmkit tokenize`")
        if eval_sources:  # held-out text given separately: tokenize it on its own
            corpus.eval_corpus = tokenize_corpus(
                eval_data, tokenizer, text_column=text_column, sample_by=sample_by, cache_dir=cache_dir,
                trust_remote_code=trust_remote_code, flag="--eval-data")
        return corpus
    settings = {"text_column": text_column, "sample_by": sample_by, "max_samples": max_samples,
                "validation_split": 0.0 if eval_sources else validation_split}
    key = cache_key(kind="lm", train=[s.fingerprint() for s in train_sources],
                    eval=[s.fingerprint() for s in eval_sources], tokenizer=fingerprint(tokenizer), **settings)
    final = Path(output) if output is not None else cache_root(cache_dir) / f"lm-{key}"
    if (final / src.TOKENIZED_MARKER).is_file():
        info = src.read_json(final / src.TOKENIZED_MARKER)
        if info.get("key") == key:
            info["cached"] = True
            return TokenizedCorpus(final, info)
    if output is not None and final.exists():
        _remove_earlier_output(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with _tokenizing() as progress, building(final) as tmp:
        batches = src.iter_text_batches(train_sources, text_column, sample_by, trust_remote_code=trust_remote_code)
        stats = _write_documents(batches, tokenizer, tmp, settings["validation_split"], max_samples, progress,
                                 flag=flag)
        if eval_sources:
            eval_batches = src.iter_text_batches(eval_sources, text_column, sample_by,
                                                 trust_remote_code=trust_remote_code)
            eval_stats = _write_documents(eval_batches, tokenizer, tmp, 0.0, None, progress, train_name="validation",
                                          flag="--eval-data")
            stats.update(validation_documents=eval_stats["documents"], validation_tokens=eval_stats["tokens"])
        seconds = time.perf_counter() - start
        info = {"key": key, "tokenizer": fingerprint(tokenizer), "separator_id": separator_id(tokenizer),
                "vocab_size": len(tokenizer), **settings, **stats, "seconds": round(seconds, 3),
                "tokens_per_second": round((stats["tokens"] + stats["validation_tokens"]) / max(seconds, 1e-9))}
        (tmp / src.TOKENIZED_MARKER).write_text(json.dumps(info, indent=2))
    info["cached"] = False
    return TokenizedCorpus(final, info)


@contextlib.contextmanager
def _tokenizing() -> Iterator[Any]:
    """A progress callback (documents, tokens) that shows the documents and tokens done (on a terminal only;
    nothing in logs or when quiet)."""
    with display.StepProgress("tokenize", None, unit="documents") as shown:
        done = {"documents": 0, "tokens": 0}

        def advance(documents: int, tokens: int) -> None:
            done["documents"] += documents
            done["tokens"] += tokens
            figures = {"tokens": done["tokens"]}
            if shown.due():
                figures["tok/s"] = done["tokens"] / max(time.perf_counter() - shown.start, 1e-9)
            shown.update(done["documents"], **figures)

        yield advance


def check_replaceable(path: Path) -> None:
    """A new `llmkit tokenize` output may replace an earlier one (it has llmkit's marker) or an empty directory;
    anything else is someone's data: refuse, before any work."""
    if not path.exists() or path.is_dir() and ((path / src.TOKENIZED_MARKER).is_file() or not any(path.iterdir())):
        return
    raise UsageError(f"{path} exists and is not an `llmkit tokenize` output (no {src.TOKENIZED_MARKER}): move "
                     "it away, or choose another --output")


def _remove_earlier_output(path: Path) -> None:
    check_replaceable(path)
    shutil.rmtree(path)


def _write_documents(batches: Iterator[list[str]], tokenizer, directory: Path, validation_split: float,
                     max_samples: int | None, progress=None, train_name: str = "train", flag: str = "--data") -> dict:
    import pyarrow as pa

    raw = untruncated(tokenizer)
    sep = separator_id(tokenizer)
    encode = getattr(raw, "encode_batch_fast", raw.encode_batch)
    rng = np.random.default_rng(VALIDATION_SEED)
    schema = pa.schema([("input_ids", pa.list_(pa.int32()))])
    counts = {"documents": 0, "tokens": 0, "validation_documents": 0, "validation_tokens": 0}
    writers = {train_name: pa.ipc.new_stream(str(directory / f"{train_name}.arrow"), schema)}
    if validation_split > 0:
        writers["validation"] = pa.ipc.new_stream(str(directory / "validation.arrow"), schema)
    try:
        for texts, encodings in _encode_ahead(_first_samples(batches, max_samples), encode):
            ids = [e.ids for e in encodings]
            lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + 1  # + the separator
            ends = np.cumsum(lengths)
            values = np.full(int(ends[-1]), sep, dtype=np.int32)
            not_sep = np.ones(len(values), dtype=bool)
            not_sep[ends - 1] = False
            values[not_sep] = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=len(values) - len(ids))
            held_out = rng.random(len(texts)) < validation_split if validation_split > 0 else None
            for name, keep in ((train_name, None if held_out is None else ~held_out), ("validation", held_out)):
                if name not in writers or keep is not None and not keep.any():
                    continue
                part_lengths, part_values = lengths, values
                if keep is not None and not keep.all():
                    doc_of_token = np.repeat(keep, lengths)
                    part_lengths, part_values = lengths[keep], values[doc_of_token]
                offsets = np.zeros(len(part_lengths) + 1, dtype=np.int32)
                np.cumsum(part_lengths, out=offsets[1:])
                array = pa.ListArray.from_arrays(_arrow_int32(offsets), _arrow_int32(part_values))
                writers[name].write_batch(pa.record_batch([array], schema=schema))
                prefix = "" if name == train_name else "validation_"
                counts[prefix + "documents"] += len(part_lengths)
                counts[prefix + "tokens"] += int(part_lengths.sum())
            if progress is not None:
                progress(len(texts), int(lengths.sum()))
    finally:
        for writer in writers.values():
            writer.close()
    if counts["documents"] == 0:
        raise LlmkitError(f"the data holds no text: check {flag} (and --text-column)")
    return counts


def _arrow_int32(values: np.ndarray):
    """An int32 numpy array as an Arrow array, sharing its memory. Not pa.array: its first call imports pandas
    (~0.15 s on one core) to check whether it was given a pandas object, inside tokenizing's timed pass, where it
    also takes a core from the encoder. `llmkit tokenize` of the benchmark's x4 corpus (3.7 M tokens), six runs
    alternating with pa.array's on a Zen 4 VM: 1.10-1.26 -> 1.24-1.39 M tok/s, the same bytes written."""
    import pyarrow as pa

    if values.dtype != np.int32:  # a cast here would wrap larger ids around silently
        raise TypeError(f"_arrow_int32 takes int32 values, not {values.dtype}")
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(pa.int32(), len(values), [None, pa.py_buffer(values)])


def _first_samples(batches: Iterator[list[str]], max_samples: int | None) -> Iterator[list[str]]:
    """The batches, cut after `max_samples` texts (all of them for None)."""
    seen = 0
    for texts in batches:
        if max_samples is not None:
            texts = texts[: max_samples - seen]
            if not texts:
                return
        seen += len(texts)
        yield texts


def _encode_ahead(batches: Iterator[list[str]], encode) -> Iterator[tuple[list[str], list]]:
    """(texts, encodings) per batch. Each batch is encoded in a thread (the Rust encoder releases the GIL) while
    the caller packs and writes the batch before and reads the one after, so Python's share hides behind encoding."""
    with ThreadPoolExecutor(1, thread_name_prefix="llmkit-encode") as pool:
        pending = None
        for texts in batches:
            future = pool.submit(encode, texts, add_special_tokens=False)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (texts, future)
        if pending is not None:
            yield pending[0], pending[1].result()


class TokenStream:
    """The concatenated token ids of a tokenized split, memory-mapped; slices may cross Arrow batches."""

    def __init__(self, path: Path):
        import datasets

        datasets.disable_progress_bars()
        self.dataset = datasets.Dataset.from_file(str(path))  # memory-mapped, no copy
        chunks = self.dataset.data.column("input_ids").chunks
        self.chunks = [c.flatten().to_numpy(zero_copy_only=True) for c in chunks if len(c)]
        self.starts = np.cumsum([0] + [len(c) for c in self.chunks])
        self.n_tokens = int(self.starts[-1])
        self.n_documents = len(self.dataset)

    def slice(self, start: int, stop: int) -> np.ndarray:
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        out = []
        while start < stop:
            chunk = self.chunks[first]
            lo = start - self.starts[first]
            hi = min(len(chunk), stop - self.starts[first])
            out.append(chunk[lo:hi])
            start += hi - lo
            first += 1
        return out[0] if len(out) == 1 else np.concatenate(out)


class PackedBlocks:
    """Fixed-size blocks of a token stream: block i is tokens [i*block_size, (i+1)*block_size)."""

    def __init__(self, stream: TokenStream, block_size: int):
        self.stream = stream
        self.block_size = block_size
        self.n_blocks = stream.n_tokens // block_size

    def __len__(self) -> int:
        return self.n_blocks

    def lengths(self) -> None:
        return None  # all blocks are full: nothing to group by length

    def batch(self, indices: np.ndarray) -> dict[str, Any]:
        import torch

        bs = self.block_size
        rows = np.stack([self.stream.slice(int(i) * bs, (int(i) + 1) * bs) for i in indices])
        return {"input_ids": torch.from_numpy(rows.astype(np.int64))}


# ---------------------------------------------------------------------------------------------------------------
# Classification


@dataclass
class LabelSpace:
    names: list[str]
    multi_label: bool = False

    @property
    def label2id(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))


def label_names(value: Any, multi_label: bool, separator: str) -> list[str]:
    """The label name(s) of one example: ints and strings become strings; multi-label splits lists."""
    if value is None:
        return []
    if multi_label:
        if isinstance(value, (list, tuple)):
            return [str(v).strip() for v in value if str(v).strip()]
        text = str(value).strip()
        if text.startswith("["):
            try:
                return [str(v).strip() for v in json.loads(text)]
            except json.JSONDecodeError:
                pass
        return [part.strip() for part in text.split(separator) if part.strip()]
    return [src.cell_text(value).strip()]


def infer_label_space(values: list[Any], multi_label: bool, separator: str,
                      declared: list[str] | None = None) -> LabelSpace:
    """The labels found in `values`, sorted; or, for a ClassLabel column, all the names it `declared`, in its order,
    so that the model's label ids are the dataset's."""
    names = sorted({n for v in values for n in label_names(v, multi_label, separator)}, key=_label_order)
    if len(names) < 2 and not multi_label:
        found = names[0] if names else "none"
        raise LlmkitError(f"the training labels hold a single class ({found}): a classifier needs at least two; "
                          "check --label-column and the data")
    if not names:
        raise LlmkitError("the training data holds no labels: check --label-column")
    return LabelSpace(declared or names, multi_label)


def class_label_names(table, column: str) -> list[str] | None:
    """The names of a `datasets` ClassLabel column, or None. Hub datasets (imdb, ag_news, glue) store labels as
    ids and keep their names in the column's feature."""
    import datasets

    feature = table.features.get(column)
    feature = getattr(feature, "feature", feature)  # multi-label: a list of ClassLabel
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def _named(ids: list[Any], names: list[str]) -> list[Any]:
    """ClassLabel ids as their names; a negative id (-1 marks the unlabelled test rows of GLUE) as no label."""
    def name(i: int | None) -> str | None:
        return names[i] if i is not None and i >= 0 else None

    return [[names[i] for i in v if i >= 0] if isinstance(v, list) else name(v) for v in ids]


def _label_order(name: str) -> tuple:
    """Numbers by value, then the rest by name. A label "nan" sorts as a name: NaN is unordered, and the label ids
    would then depend on the order of the rows."""
    try:
        number = float(name)
    except ValueError:
        return (1, 0.0, name)
    return (1, 0.0, name) if math.isnan(number) else (0, number, name)


def prepare_classification(data: list[str], tokenizer, labels: LabelSpace | None, *, text_column: str | None,
                           text_pair_column: str | None, label_column: str | None, max_length: int,
                           multi_label: bool = False, label_separator: str = ",", max_samples: int | None = None,
                           cache_dir: str | None = None, trust_remote_code: bool = False, flag: str = "--data",
                           require_labels: bool = True):
    """Tokenized, label-mapped examples (a datasets.Dataset with input_ids, labels) and the label space."""
    import datasets

    sources = src.resolve(data, flag)
    table = src.load_table(sources, trust_remote_code)
    where = ", ".join(s.name for s in sources)
    if max_samples is not None:
        table = table.select(range(min(max_samples, len(table))))
    if len(table) == 0:
        raise LlmkitError(f"{where} holds no rows: give data with examples")
    text_col = src.pick_column(table.column_names, text_column, src.TEXT_COLUMNS, "text", "--text-column", where)
    pair_col = None
    if text_pair_column is not None:
        pair_col = src.pick_column(table.column_names, text_pair_column, (), "text pair", "--text-pair-column", where)
    label_col = None
    try:
        label_col = src.pick_column(table.column_names, label_column, src.LABEL_COLUMNS, "label", "--label-column",
                                    where)
    except UsageError:
        if require_labels or label_column is not None:
            raise
    raw_labels = table[label_col] if label_col else None
    declared = class_label_names(table, label_col) if label_col else None
    if declared is not None:
        raw_labels = _named(raw_labels, declared)
    if labels is None:
        labels = infer_label_space(raw_labels, multi_label, label_separator, declared)
    key = cache_key(kind="cls", data=[s.fingerprint() for s in sources], tokenizer=fingerprint(tokenizer),
                    text=text_col, pair=pair_col, label=label_col, names=labels.names, multi=labels.multi_label,
                    sep=label_separator, max_length=max_length, max_samples=max_samples)
    final = cache_root(cache_dir) / f"cls-{key}"
    if not (final / "dataset_info.json").is_file():
        label_ids = _map_labels(raw_labels, labels, label_separator, where) if raw_labels is not None else None
        texts = [src.cell_text(t) for t in table[text_col]]
        pairs = [src.cell_text(t) for t in table[pair_col]] if pair_col else None
        encoded: dict[str, list] = {"input_ids": [], "token_type_ids": []}
        # In parts (each still a parallel batch for the fast tokenizer), to show progress.
        with display.StepProgress("tokenize", len(texts), unit="examples") as shown:
            for begin in range(0, len(texts), PART):
                part = tokenizer(texts[begin:begin + PART], pairs[begin:begin + PART] if pairs else None,
                                 truncation=True, max_length=max_length, padding=False,
                                 return_attention_mask=False, return_token_type_ids=pair_col is not None)
                for name in encoded:
                    encoded[name].extend(part.get(name, ()))
                shown.update(min(begin + PART, len(texts)))
        columns: dict[str, Any] = {"input_ids": encoded["input_ids"]}
        if pair_col:
            columns["token_type_ids"] = encoded["token_type_ids"]
        if label_ids is not None:
            columns["labels"] = label_ids
        columns["truncated"] = [len(ids) >= max_length for ids in encoded["input_ids"]]
        final.parent.mkdir(parents=True, exist_ok=True)
        with building(final) as tmp:
            datasets.Dataset.from_dict(columns).save_to_disk(str(tmp))
    return datasets.load_from_disk(str(final)), labels


def _map_labels(values: list[Any], labels: LabelSpace, separator: str, where: str) -> list:
    index = labels.label2id
    unknown: set[str] = set()
    out: list = []
    for value in values:
        names = label_names(value, labels.multi_label, separator)
        unknown.update(n for n in names if n not in index)
        if labels.multi_label:
            row = [0.0] * len(labels.names)
            for n in names:
                if n in index:
                    row[index[n]] = 1.0
            out.append(row)
        else:
            out.append(index.get(names[0], -1) if names else -1)
    if unknown:
        shown = ", ".join(sorted(unknown, key=_label_order)[:10])
        raise LlmkitError(f"{where} has labels the model does not know ({shown}); the model knows "
                          f"{', '.join(labels.names[:20])}: map them, or fine-tune on data with these labels")
    if not labels.multi_label and -1 in out:
        raise LlmkitError(f"{where} has rows without a label (row {out.index(-1) + 1}): fill them in or drop them")
    return out


class LabeledExamples:
    """Classification examples with dynamic padding: each batch is padded to its own longest example."""

    def __init__(self, dataset, pad_id: int):
        self.dataset = dataset.with_format("numpy")
        self.pad_id = pad_id
        self._lengths = np.fromiter((len(x) for x in dataset["input_ids"]), dtype=np.int64, count=len(dataset))
        self.has_labels = "labels" in dataset.column_names
        self._labels = np.asarray(dataset["labels"]) if self.has_labels else None
        self.has_pairs = "token_type_ids" in dataset.column_names

    def __len__(self) -> int:
        return len(self._lengths)

    def lengths(self) -> np.ndarray:
        return self._lengths

    def labels_at(self, indices: np.ndarray) -> np.ndarray:
        return self._labels[indices]

    def batch(self, indices: np.ndarray) -> dict[str, Any]:
        import torch

        rows = self.dataset[[int(i) for i in indices]]
        width = int(self._lengths[indices].max())
        ids = np.full((len(indices), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(indices), width), dtype=np.int64)
        types = np.zeros((len(indices), width), dtype=np.int64) if self.has_pairs else None
        for r, seq in enumerate(rows["input_ids"]):
            ids[r, : len(seq)] = seq
            mask[r, : len(seq)] = 1
            if types is not None:
                types[r, : len(seq)] = rows["token_type_ids"][r]
        batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if types is not None:
            batch["token_type_ids"] = torch.from_numpy(types)
        if self.has_labels:
            labels = np.asarray(rows["labels"])
            batch["labels"] = torch.from_numpy(labels.astype(np.float32 if labels.ndim == 2 else np.int64))
        return batch


# ---------------------------------------------------------------------------------------------------------------
# Order of examples


class StepSampler:
    """Which examples each process sees at each optimizer step.

    Every epoch is a seeded permutation of the examples, cut into global batches; step s takes global batch s,
    and process r of P takes its r-th share of it, split into micro-batches. The order therefore depends on
    the seed and the global batch only - not on the number of processes or the accumulation - which is what
    makes a 2-process run equal a 1-process run, and a resumed run equal an uninterrupted one. With lengths,
    examples of similar length are grouped (sorted inside mega-batches of 50 global batches) to cut padding.
    """

    def __init__(self, n_examples: int, global_batch: int, seed: int, lengths: np.ndarray | None = None,
                 shuffle: bool = True):
        if n_examples < global_batch:
            raise LlmkitError(f"the training data has {n_examples} examples, fewer than one global batch of "
                              f"{global_batch}: give more data or a smaller --global-batch-size")
        self.n = n_examples
        self.global_batch = global_batch
        self.seed = seed
        self.lengths = lengths
        self.shuffle = shuffle
        self.steps_per_epoch = n_examples // global_batch
        self._epoch_cache: tuple[int, np.ndarray] | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self._epoch_cache and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        order = order[: self.steps_per_epoch * self.global_batch]
        if self.lengths is not None:
            mega = self.global_batch * 50
            for start in range(0, len(order), mega):
                part = order[start:start + mega]
                order[start:start + mega] = part[np.argsort(-self.lengths[part], kind="stable")]
            batches = order.reshape(self.steps_per_epoch, self.global_batch)
            order = batches[rng.permutation(self.steps_per_epoch)].reshape(-1)
        self._epoch_cache = (epoch, order)
        return order

    def micro_batches(self, step: int, rank: int, world: int, micro: int) -> list[np.ndarray]:
        epoch, within = divmod(step, self.steps_per_epoch)
        batch = self.epoch_order(epoch)[within * self.global_batch:(within + 1) * self.global_batch]
        share = self.global_batch // world
        mine = batch[rank * share:(rank + 1) * share]
        return [mine[i:i + micro] for i in range(0, share, micro)]


def shard(n: int, rank: int, world: int) -> np.ndarray:
    """Contiguous, disjoint, exhaustive shares of n examples for evaluation (no padding, no duplicates)."""
    bounds = np.linspace(0, n, world + 1).astype(np.int64)
    return np.arange(bounds[rank], bounds[rank + 1])
