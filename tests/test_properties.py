"""Properties of the data pipeline for any input hypothesis can think of: packing keeps every token exactly once,
label mapping round-trips, the cache key follows every input that matters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from llmkit import data as pipeline
from llmkit import sources as src
from llmkit.errors import LlmkitError

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------------------------------------------------------
# Packing


def _write_stream(path: Path, lengths: list[int], batch_sizes: list[int]) -> None:
    """Documents of the given lengths holding the token ids 0, 1, 2, ... in order, written as llmkit writes them:
    an Arrow stream of list<int32> rows, in record batches of the given sizes (so slices cross batches)."""
    schema = pa.schema([("input_ids", pa.list_(pa.int32()))])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    with pa.ipc.new_stream(str(path), schema) as writer:
        first, sizes = 0, iter(batch_sizes)
        while first < len(lengths):
            last = min(len(lengths), first + next(sizes, len(lengths)))
            part = offsets[first:last + 1]
            values = pa.array(np.arange(part[0], part[-1], dtype=np.int32))
            array = pa.ListArray.from_arrays(pa.array(part - part[0]), values)
            writer.write_batch(pa.record_batch([array], schema=schema))
            first = last


@SETTINGS
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=60),
       batch_sizes=st.lists(st.integers(1, 20), max_size=10), block_size=st.integers(1, 200))
def test_packing_keeps_every_token_once(tmp_path, lengths, batch_sizes, block_size):
    path = tmp_path / f"stream-{len(list(tmp_path.iterdir()))}.arrow"
    _write_stream(path, lengths, batch_sizes)
    stream = pipeline.TokenStream(path)
    total = sum(lengths)
    assert stream.n_tokens == total and stream.n_documents == len(lengths)
    blocks = pipeline.PackedBlocks(stream, block_size)
    assert len(blocks) == total // block_size
    if len(blocks):
        packed = blocks.batch(np.arange(len(blocks)))["input_ids"]
        assert packed.shape == (len(blocks), block_size)
        # ids are 0..total-1 in order: equality means no token lost, duplicated or moved
        assert packed.reshape(-1).tolist() == list(range(len(blocks) * block_size))
        shuffled = np.random.default_rng(0).permutation(len(blocks))
        again = blocks.batch(shuffled)["input_ids"]
        assert again.tolist() == packed[shuffled].tolist()
    assert total - len(blocks) * block_size < block_size  # only the tail shorter than a block is left out


@SETTINGS
@given(lengths=st.lists(st.integers(0, 30), min_size=1, max_size=40),
       batch_sizes=st.lists(st.integers(1, 10), max_size=8), data=st.data())
def test_any_slice_of_the_stream_is_exact(tmp_path, lengths, batch_sizes, data):
    path = tmp_path / f"stream-{len(list(tmp_path.iterdir()))}.arrow"
    _write_stream(path, lengths, batch_sizes)
    stream = pipeline.TokenStream(path)
    assume(stream.n_tokens > 0)
    start = data.draw(st.integers(0, stream.n_tokens - 1))
    stop = data.draw(st.integers(start + 1, stream.n_tokens))
    assert stream.slice(start, stop).tolist() == list(range(start, stop))


@pytest.fixture(scope="module")
def bpe(tokenizer_dir):
    from llmkit.tokenizer import load_tokenizer

    return load_tokenizer(str(tokenizer_dir))


@SETTINGS
@given(batches=st.lists(st.lists(st.text(min_size=0, max_size=30), min_size=1, max_size=8), min_size=1, max_size=5),
       validation_split=st.sampled_from([0.0, 0.3, 0.7]))
def test_tokenized_documents_are_split_whole_and_kept_once(tmp_path, bpe, batches, validation_split):
    assume(any(t for batch in batches for t in batch))
    directory = tmp_path / f"docs-{len(list(tmp_path.iterdir()))}"
    directory.mkdir()
    counts = pipeline._write_documents(iter(batches), bpe, directory, validation_split, None)
    sep = bpe.eos_token_id
    expected = [bpe(t, add_special_tokens=False)["input_ids"] + [sep] for batch in batches for t in batch]
    train = pipeline.TokenStream(directory / "train.arrow") if (directory / "train.arrow").stat().st_size else None
    parts = {"train": train}
    if validation_split:
        parts["validation"] = pipeline.TokenStream(directory / "validation.arrow")
    documents = []
    for stream in parts.values():
        if stream is not None and stream.n_documents:
            documents += [list(row) for row in stream.dataset["input_ids"]]
    # every document lands whole in exactly one split: the multiset of documents is unchanged
    assert sorted(map(tuple, documents)) == sorted(map(tuple, expected))
    assert counts["tokens"] + counts["validation_tokens"] == sum(map(len, expected))
    assert counts["documents"] + counts["validation_documents"] == len(expected)


# ---------------------------------------------------------------------------------------------------------------
# Labels

label_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters=",[]"), min_size=1,
                     max_size=8).map(str.strip).filter(bool)
special = st.sampled_from(["0", "1", "01", "1.0", "-1", "nan", "inf", "NaN", "True", "None", " x ", "é", "2e3"])
single_label = st.one_of(st.integers(-5, 50), label_text, special,
                         st.integers(-5, 50).map(float))  # 3.0 is read from a CSV as 3


def _normal(value) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


@SETTINGS
@given(values=st.lists(single_label, min_size=2, max_size=60), seed=st.integers(0, 100))
def test_single_label_mapping_round_trips(values, seed):
    assume(len({_normal(v) for v in values}) >= 2)
    space = pipeline.infer_label_space(values, multi_label=False, separator=",")
    ids = pipeline._map_labels(values, space, ",", "data")
    assert [space.names[i] for i in ids] == [_normal(v) for v in values]
    assert sorted(space.names) == sorted({_normal(v) for v in values})
    assert {space.label2id[n]: n for n in space.names} == space.id2label
    shuffled = [values[i] for i in np.random.default_rng(seed).permutation(len(values))]
    assert pipeline.infer_label_space(shuffled, False, ",").names == space.names  # ids do not depend on row order


@SETTINGS
@given(rows=st.lists(st.lists(label_text, max_size=4), min_size=1, max_size=40),
       form=st.sampled_from(["list", "json", "separated"]), separator=st.sampled_from([",", ";", "|"]))
def test_multi_label_mapping_round_trips(rows, form, separator):
    assume(any(rows))
    assume(not any(separator in name for row in rows for name in row))
    encode = {"list": lambda row: row, "json": json.dumps, "separated": separator.join}[form]
    values = [encode(row) for row in rows]
    space = pipeline.infer_label_space(values, multi_label=True, separator=separator)
    hot = pipeline._map_labels(values, space, separator, "data")
    decoded = [{space.names[j] for j, v in enumerate(row) if v} for row in hot]
    assert decoded == [set(row) for row in rows]
    assert all(len(row) == len(space.names) for row in hot)


@SETTINGS
@given(known=st.lists(label_text, min_size=2, max_size=6, unique=True), data=st.data())
def test_evaluation_labels_must_be_known(known, data):
    space = pipeline.LabelSpace(sorted(known))
    seen = data.draw(st.lists(st.sampled_from(known), min_size=1, max_size=20))
    assert [space.names[i] for i in pipeline._map_labels(seen, space, ",", "eval")] == seen
    stranger = data.draw(label_text.filter(lambda t: t not in known))
    with pytest.raises(LlmkitError, match="labels the model does not know"):
        pipeline._map_labels(seen + [stranger], space, ",", "eval")


# ---------------------------------------------------------------------------------------------------------------
# Cache keys

json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                          lambda inner: st.lists(inner, max_size=3), max_leaves=6)


@SETTINGS
@given(parts=st.dictionaries(st.text(min_size=1, max_size=10), json_value, min_size=1, max_size=8), data=st.data())
def test_cache_key_follows_every_part(parts, data):
    key = pipeline.cache_key(**parts)
    assert pipeline.cache_key(**dict(reversed(list(parts.items())))) == key  # the order of the parts does not matter
    name = data.draw(st.sampled_from(sorted(parts)))
    changed = data.draw(json_value.filter(lambda v: json.dumps(v) != json.dumps(parts[name])))
    assert pipeline.cache_key(**{**parts, name: changed}) != key
    extra = data.draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in parts))
    assert pipeline.cache_key(**parts, **{extra: None}) != key  # a new setting is a new key, even when unset


@SETTINGS
@given(content=st.binary(min_size=1, max_size=2000), data=st.data())
def test_data_fingerprint_follows_the_bytes_not_the_name(tmp_path, content, data):
    n = len(list(tmp_path.iterdir()))
    a, b, c = tmp_path / f"a{n}.txt", tmp_path / f"b{n}.txt", tmp_path / f"c{n}.txt"
    a.write_bytes(content)
    b.write_bytes(content)
    position = data.draw(st.integers(0, len(content) - 1))
    flipped = bytearray(content)
    flipped[position] ^= data.draw(st.integers(1, 255))
    c.write_bytes(bytes(flipped))

    def fingerprint(path):
        return src.Source("file", str(path), [path]).fingerprint()

    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint(c)
    assert src.Source("file", "x", [a, b]).fingerprint() != fingerprint(a)  # the same file twice is more data


def test_tokenize_cache_key_follows_each_setting(shakespeare, bpe, wordpiece_dir, tmp_path):
    """Through tokenize_corpus itself: every setting that changes the tokens gives another cache entry."""
    from llmkit.tokenizer import load_tokenizer

    base = dict(validation_split=0.1, sample_by="paragraph", max_samples=200, cache_dir=str(tmp_path))
    first = pipeline.tokenize_corpus([str(shakespeare)], bpe, **base)
    assert pipeline.tokenize_corpus([str(shakespeare)], bpe, **base).path == first.path
    variants = [dict(validation_split=0.2), dict(sample_by="line"), dict(max_samples=100), dict(text_column="x")]
    paths = {first.path}
    for change in variants:
        paths.add(pipeline.tokenize_corpus([str(shakespeare)], bpe, **{**base, **change}).path)
    paths.add(pipeline.tokenize_corpus([str(shakespeare)], load_tokenizer(str(wordpiece_dir)), **base).path)
    paths.add(pipeline.tokenize_corpus([str(shakespeare)], bpe, eval_data=[str(shakespeare)], **base).path)
    assert len(paths) == len(variants) + 3
