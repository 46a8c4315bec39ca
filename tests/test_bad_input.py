"""Every bad input a user can reasonably make, through the installed `llmkit` entry point: one line on stderr
naming the problem and the fix, exit status 2 for usage errors and 1 for runtime errors, no traceback, no output
directory left behind, and the input files untouched.

The cases of the table run two at a time (each is a fresh process that imports torch) in one module fixture,
then each case's test checks its own result.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmkit.errors import LlmkitError

LLMKIT = shutil.which("llmkit", path=str(Path(sys.executable).parent)) or "llmkit"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]  # {placeholders} are filled from the fixtures; {out} is the case's own output path
    code: int  # 2: usage error, 1: runtime error
    message: str  # a fragment of the one-line error


def case(id: str, command: str, code: int, message: str) -> Case:
    return Case(id, tuple(command.split()), code, message)


TRAIN = "--data {shakespeare} --tokenizer {tok} --block-size 64 --output {out}"
FINETUNE = "finetune --model {mlm} --output {out}"

CASES = [
    # data files
    case("missing-data", "pretrain --data {tmp}/missing.txt --output {out}", 2, "missing.txt does not exist"),
    case("empty-data", "pretrain --data {bad}/empty.txt --output {out}", 1, "empty.txt is empty"),
    case("binary-data", "pretrain --data {bad}/binary.txt --output {out}", 1, "binary.txt is a binary file"),
    case("non-utf8-text", "pretrain --data {bad}/latin1.txt --tokenizer {tok} --output {out}", 1,
         "latin1.txt, line 3: not valid UTF-8"),
    case("non-utf8-csv", FINETUNE + " --data {bad}/latin1.csv", 1, "latin1.csv, line 4: not valid UTF-8"),
    case("ragged-csv", FINETUNE + " --data {bad}/ragged.csv", 1, "Expected 2 fields in line 3"),
    case("broken-jsonl", FINETUNE + " --data {bad}/broken.jsonl", 1, "broken.jsonl, line 2: not valid JSON"),
    case("data-dir-without-data", "pretrain --data {bad}/no-data --output {out}", 2, "holds no data files"),
    case("header-only-csv", FINETUNE + " --data {bad}/header-only.csv", 1,
         "header-only.csv holds a header but no rows"),
    # columns and labels
    case("no-text-column", FINETUNE + " --data {bad}/no-text.csv", 2, "has no text column"),
    case("misspelt-text-column", FINETUNE + " --data {sst2_train} --text-column sentense", 2,
         "did you mean `sentence`"),
    case("no-label-column", FINETUNE + " --data {bad}/no-label.csv", 2, "has no label column"),
    case("misspelt-label-column", FINETUNE + " --data {sst2_train} --label-column lable", 2,
         "did you mean `label`"),
    case("single-class", FINETUNE + " --data {bad}/single-class.csv", 1, "single class"),
    case("unknown-labels-at-evaluation", "evaluate --model {cls} --eval-data {bad}/string-labels.tsv", 1,
         "labels the model does not know"),
    # sizes and rates
    case("block-size-over-positions", "evaluate --model {clm} --eval-data {shakespeare} --block-size 4096", 2,
         "larger than the model's 128 positions"),
    case("block-size-over-positions-pretrain", "pretrain --model {clm} --data {shakespeare} --block-size 4096 "
         "--output {out}", 2, "--block-size 4096 is larger than the model's 128 positions: use --block-size 128"),
    case("max-length-over-positions-finetune", FINETUNE + " --data {sst2_train} --max-length 4096", 2,
         "--max-length 4096 is larger than the model's 128 positions: use --max-length 128"),
    case("max-length-over-positions-classify", "classify hello --model {cls} --max-length 4096", 2,
         "--max-length 4096 is larger than the model's 128 positions: use --max-length 128"),
    case("max-length-over-positions-evaluate", "evaluate --model {cls} --eval-data {sst2_test} --max-length 4096", 2,
         "--max-length 4096 is larger than the model's 128 positions: use --max-length 128"),
    case("tokenizer-bigger-than-model", "pretrain --model {clm} --tokenizer {minilm} --data {shakespeare} "
         "--output {out}", 1, "the tokenizer has 30522 tokens but the model's embedding only 1000"),
    case("zero-steps", "pretrain " + TRAIN + " --max-steps 0", 2, "--max-steps must be greater than 0"),
    case("negative-rate-and-sizes", FINETUNE + " --data {sst2_train} --learning-rate -1e-4 --global-batch-size 0 "
         "--warmup-steps -1", 2, "--learning-rate must be greater than 0, not -0.0001; --warmup-steps must be 0 or "
         "more, not -1.0; --global-batch-size must be greater than 0"),
    case("split-over-one", "pretrain " + TRAIN + " --validation-split 1.5", 2, "--validation-split must be between"),
    case("not-a-number", "pretrain " + TRAIN + " --learning-rate fast", 2, "Invalid value for '--learning-rate'"),
    # recipes
    case("recipe-yaml-syntax", "pretrain " + TRAIN + " --recipe {bad}/syntax.yaml", 2, "is not valid YAML at line 3"),
    case("recipe-unknown-and-mistyped-keys", "pretrain " + TRAIN + " --recipe {bad}/keys.yaml", 2,
         "unknown key `max_stpes` in recipe"),
    case("recipe-mistyped-float", "pretrain " + TRAIN + " --recipe {bad}/mistyped-rate.yaml", 2,
         "`learning_rate` must be a number, not 'fast' in recipe {bad}/mistyped-rate.yaml"),
    case("recipe-mistyped-int", FINETUNE + " --data {sst2_train} --recipe {bad}/mistyped-steps.yaml", 2,
         "`max_steps` must be a whole number, not 'ten' in recipe {bad}/mistyped-steps.yaml"),
    case("recipe-not-a-mapping", "pretrain " + TRAIN + " --recipe {bad}/list.yaml", 2, "must be a mapping"),
    case("recipe-missing", "pretrain " + TRAIN + " --recipe {tmp}/missing.yaml", 2, "missing.yaml does not exist"),
    case("unknown-flag", "pretrain " + TRAIN + " --max-stpes 3", 2, "No such option: --max-stpes"),
    # resuming
    case("resume-auto-without-checkpoint", "pretrain " + TRAIN + " --resume auto", 2, "found no complete checkpoint"),
    case("resume-from-another-model", "pretrain " + TRAIN + " --layers 3 --resume {clm_checkpoint}", 2,
         "belongs to another model"),
    case("resume-from-a-non-checkpoint", "pretrain " + TRAIN + " --resume {tok}", 2, "is not a checkpoint directory"),
    # models
    case("corrupt-weights-evaluate", "evaluate --model {broken} --eval-data {shakespeare}", 1,
         "weights in {broken} are corrupt or truncated"),
    case("corrupt-weights-finetune", "finetune --model {broken} --data {sst2_train} --output {out}", 1,
         "weights in {broken} are corrupt or truncated"),
    case("corrupt-weights-classify", "classify hello --model {broken_cls}", 1,
         "weights in {broken_cls} are corrupt or truncated"),
    case("pickled-weights-only", "finetune --model {bin_only} --data {sst2_train} --output {out}", 1,
         "holds its weights only as pytorch_model.bin, a pickle that can run code when loaded: llmkit reads model "
         "weights only from safetensors; if you trust its source, convert it once"),
    case("model-without-tokenizer", "evaluate --model {no_tokenizer} --eval-data {shakespeare}", 1,
         "holds no tokenizer"),
    case("model-is-a-file", "finetune --model {clm}/model.safetensors --data {sst2_train} --output {out}", 1,
         "is a file, not a model directory"),
    case("tokenizer-is-not-a-model", "finetune --model {tok} --data {sst2_train} --output {out}", 1,
         "is not a model directory (no config.json)"),
    case("classify-with-a-language-model", "classify hello --model {clm}", 1, "is not a classifier"),
    case("hub-model-offline", "finetune --model some-org/no-such-model --data {sst2_train} --output {out}", 1,
         "model 'some-org/no-such-model' is not a local directory, and the Hub is off"),
    case("hub-dataset-offline", "pretrain --data some-org/no-such-dataset --output {out}", 1,
         "some-org/no-such-dataset is not a local file, and the Hub is off"),
    case("hub-metric-offline", "evaluate --model {cls} --eval-data {sst2_test} --max-samples 8 --metric bleu", 1,
         "metric 'bleu' is not built in and the Hub is off"),
    # outputs
    case("disk-full", "evaluate --model {cls} --eval-data {sst2_test} --max-samples 8 --output /dev/full", 1,
         "no space left on the device"),
    case("pretrain-output-is-a-file", "pretrain " + TRAIN.replace("{out}", "{a_file}"), 2,
         "--output {a_file} is a file"),
    case("finetune-output-is-a-file", "finetune --model {mlm} --data {sst2_train} --output {a_file}", 2,
         "--output {a_file} is a file"),
    case("tokenize-output-is-a-file", "tokenize --data {shakespeare} --output {a_file}", 2,
         "--output {a_file} is a file"),
    case("evaluate-output-is-a-directory", "evaluate --model {cls} --eval-data {sst2_test} --output {tmp}", 2,
         "is a directory: give a file name"),
    case("evaluate-predictions-under-a-file", "evaluate --model {cls} --eval-data {sst2_test} --predictions "
         "{a_file}/predictions.jsonl", 2, "is a file, not a directory"),
    case("evaluate-output-is-the-input", "evaluate --model {cls} --eval-data {sst2_test} --output {sst2_test}", 2,
         "is one of the input files"),
    case("missing-eval-data-finetune", FINETUNE + " --data {sst2_train} --eval-data {tmp}/missing.tsv", 2,
         "--eval-data {tmp}/missing.tsv does not exist"),
    case("missing-eval-data-tokenize", "tokenize --data {shakespeare} --eval-data {tmp}/missing.txt --output {out}", 2,
         "--eval-data {tmp}/missing.txt does not exist"),
    case("missing-eval-data-evaluate", "evaluate --model {cls} --eval-data {tmp}/missing.tsv", 2,
         "--eval-data {tmp}/missing.tsv does not exist"),
    case("missing-eval-data-evaluate-lm", "evaluate --model {clm} --eval-data {tmp}/missing.txt", 2,
         "--eval-data {tmp}/missing.txt does not exist"),
    case("missing-data-evaluate-lm", "evaluate --model {clm} --data {tmp}/missing.txt --split train", 2,
         "--data {tmp}/missing.txt does not exist"),
    case("blank-eval-data-pretrain", "pretrain " + TRAIN + " --eval-data {bad}/blank.txt", 1,
         "holds no text: check --eval-data"),
    case("blank-eval-data-pretokenized", "pretrain --data {tok} --block-size 64 --output {out} --eval-data "
         "{bad}/blank.txt", 1, "holds no text: check --eval-data"),
    case("blank-eval-data-evaluate-lm", "evaluate --model {clm} --eval-data {bad}/blank.txt", 1,
         "holds no text: check --eval-data"),
    case("evaluate-without-data", "evaluate --model {cls}", 2, "give the data to score"),
    case("classify-without-texts", "classify --model {cls}", 2, "nothing to classify"),
    case("classify-missing-file", "classify --model {cls} --file {tmp}/missing.txt", 2, "missing.txt does not exist"),
    # classify --file reads tables with pyarrow alone; what pyarrow cannot read gets load_table's errors
    case("classify-ragged-csv", "classify --model {cls} --file {bad}/ragged.csv", 1, "Expected 2 fields in line 3"),
    case("classify-header-only-csv", "classify --model {cls} --file {bad}/header-only.csv", 1,
         "header-only.csv holds a header but no rows"),
    case("classify-non-utf8-csv", "classify --model {cls} --file {bad}/latin1.csv", 1,
         "latin1.csv, line 4: not valid UTF-8"),
    case("classify-broken-jsonl", "classify --model {cls} --file {bad}/broken.jsonl", 1,
         "broken.jsonl, line 2: not valid JSON"),
    case("classify-no-text-column", "classify --model {cls} --file {bad}/no-text.csv", 2, "has no text column"),
    case("classify-corrupt-parquet", "classify --model {cls} --file {bad}/corrupt.parquet", 1,
         "could not parse {bad}/corrupt.parquet as Parquet"),
    case("corrupt-parquet", FINETUNE + " --data {bad}/corrupt.parquet", 1,
         "could not parse {bad}/corrupt.parquet as Parquet"),
]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.txt").write_bytes(b"")
    (d / "binary.txt").write_bytes(b"PK\x03\x04\x00\x00binary\x00data")
    (d / "latin1.txt").write_bytes("line one\nline two\ncaf\xe9 au lait\n".encode("latin-1"))
    (d / "latin1.csv").write_bytes("text,label\ngood,1\nbad,0\ncaf\xe9,1\n".encode("latin-1"))
    (d / "ragged.csv").write_text("text,label\ngood,1\nbad,0,extra,more\nfine,1\n")
    (d / "broken.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0\n{"text": "c", "label": 1}\n')
    (d / "no-data").mkdir()
    (d / "no-data" / "notes.bin").write_bytes(b"\x00")
    (d / "header-only.csv").write_text("text,label\n")
    (d / "blank.txt").write_text("\n   \n\n")  # not empty, but no text
    (d / "no-text.csv").write_text("body,label\ngood,1\nbad,0\n")
    (d / "corrupt.parquet").write_bytes(b"PAR1" + b"\x15\x04not parquet at all" * 8 + b"PAR1")
    (d / "no-label.csv").write_text("text,stars\ngood,1\nbad,0\nfine,1\n")
    (d / "single-class.csv").write_text("text,label\ngood,1\nfine,1\ngreat,1\n")
    (d / "string-labels.tsv").write_text("sentence\tlabel\ngood\tpositive\nbad\tnegative\n")
    (d / "syntax.yaml").write_text("max_steps: 10\nlearning_rate: [1e-3\n")
    (d / "keys.yaml").write_text("max_stpes: 10\nlearning_rate: fast\n")
    (d / "list.yaml").write_text("- max_steps: 10\n")
    (d / "mistyped-rate.yaml").write_text("learning_rate: fast\n")  # known keys, values of the wrong type
    (d / "mistyped-steps.yaml").write_text("max_steps: ten\n")
    (d / "a-file").write_text("an existing file, not a directory\n")
    return d


@pytest.fixture(scope="module")
def classifier(mlm_run, sst2, tmp_path_factory) -> Path:
    """A tiny classifier, fine-tuned for two steps from the tiny masked LM."""
    from llmkit.api import finetune
    from llmkit.config import FinetuneConfig, build_config

    out = tmp_path_factory.mktemp("cls") / "tiny-sst2"
    finetune(build_config(FinetuneConfig, flags=dict(model=str(mlm_run[0]), data=[str(sst2["train"])], max_samples=64,
                                                     max_steps=2, global_batch_size=16, output=str(out), quiet=True,
                                                     precision="fp32")))
    return out


@pytest.fixture(scope="module")
def paths(bad_files, classifier, shakespeare, sst2, minilm, tokenizer_dir, clm_run, mlm_run, tmp_path_factory) -> dict:
    models = tmp_path_factory.mktemp("broken-models")
    broken, broken_cls = models / "truncated-weights", models / "truncated-classifier"
    for model, copy in ((clm_run[0], broken), (classifier, broken_cls)):
        shutil.copytree(model, copy, ignore=shutil.ignore_patterns("checkpoints", "best"))
        with open(copy / "model.safetensors", "r+b") as f:
            f.truncate(f.seek(0, os.SEEK_END) // 2)
    import torch
    from safetensors.torch import load_file

    bin_only = models / "pickled-weights"  # the masked LM with its weights as a pickle (pytorch_model.bin) only
    shutil.copytree(mlm_run[0], bin_only, ignore=shutil.ignore_patterns("checkpoints", "best", "*.safetensors"))
    torch.save(load_file(mlm_run[0] / "model.safetensors"), bin_only / "pytorch_model.bin")
    no_tokenizer = models / "no-tokenizer"
    shutil.copytree(clm_run[0], no_tokenizer, ignore=shutil.ignore_patterns("checkpoints", "best", "tokenizer*"))
    checkpoints = sorted((clm_run[0] / "checkpoints").glob("step-*"))
    return {"bad": bad_files, "cls": classifier, "shakespeare": shakespeare, "sst2_train": sst2["train"],
            "sst2_test": sst2["test"], "minilm": minilm, "tok": tokenizer_dir, "clm": clm_run[0],
            "mlm": mlm_run[0], "clm_checkpoint": checkpoints[-1], "broken": broken,
            "broken_cls": broken_cls, "bin_only": bin_only, "no_tokenizer": no_tokenizer,
            "a_file": bad_files / "a-file"}


def _fill(text: str, values: dict) -> str:
    return text.format(**{k: str(v) for k, v in values.items()})


def _snapshot(args: list[str], exclude: Path) -> dict[str, tuple[str, int]]:
    """SHA-256 and mtime of every file the command line names (files, and the files of named directories)."""
    found = {}
    for arg in args:
        path = Path(arg)
        if not path.is_absolute() or not path.exists() or path.is_relative_to(exclude) or str(path).startswith("/dev"):
            continue
        for f in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            found[str(f)] = (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def outcomes(request, paths, tmp_path_factory) -> dict:
    """Run the selected cases, two at a time; case id -> (completed process, its output path, files before, after)."""
    selected = {item.callspec.params["case"].id for item in request.session.items
                if item.originalname == "test_bad_input" and hasattr(item, "callspec")}
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"}

    def run(c: Case):
        tmp = tmp_path_factory.mktemp(c.id)
        out = tmp / "out"
        args = [_fill(a, {**paths, "tmp": tmp, "out": out}) for a in c.args] + ["--quiet"]
        before = _snapshot(args, exclude=out)
        result = subprocess.run([LLMKIT, *args], capture_output=True, text=True, env=env, cwd=tmp, timeout=300)
        return c.id, (result, out, before, _snapshot(args, exclude=out), {**paths, "tmp": tmp})

    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        return dict(pool.map(run, [c for c in CASES if c.id in selected]))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, outcomes):
    result, out, before, after, values = outcomes[case.id]
    err = result.stderr
    assert "Traceback" not in err, err
    assert result.returncode == case.code, err
    assert _fill(case.message, values) in err
    assert len(err.strip().splitlines()) <= 2, err  # one line (rich may wrap a very long one)
    assert err.startswith("error: "), err
    assert not out.exists(), f"{case.id} left {sorted(p.name for p in out.iterdir())} behind"
    assert after == before, "an input file changed"


# ---------------------------------------------------------------------------------------------------------------
# A full disk while saving, for real: a 1 MB tmpfs (needs root to mount; /dev/full above covers the rest).


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root): the full-disk case runs on /dev/full only")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=False)


def test_disk_full_while_training_leaves_nothing_half_written(small_disk, mlm_run, sst2):
    from llmkit.checkpoint import verify

    out = small_disk / "run"
    result = subprocess.run([LLMKIT, "finetune", "--model", str(mlm_run[0]), "--data", str(sst2["train"]),
                             "--max-samples", "64", "--global-batch-size", "16", "--max-steps", "4", "--save-every",
                             "1", "--precision", "fp32", "--output", str(out), "--quiet"],
                            capture_output=True, text=True, env={**os.environ, **OFFLINE})
    assert result.returncode == 1, result.stderr
    assert "no space left on the device" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2, result.stderr
    leftovers = [p for p in out.rglob(".tmp-*")] + [p for p in out.rglob(".old-*")]
    assert not leftovers, leftovers
    for directory in [*out.glob("checkpoints/step-*"), out / "best"]:
        if directory.exists():
            assert verify(directory), f"{directory} is half-written"


def test_disk_full_while_tokenizing_removes_the_output(small_disk, shared):
    out = small_disk / "tok"
    result = subprocess.run([LLMKIT, "tokenize", "--data", str(shared / "tinyshakespeare" / "input.txt"),
                             "--data", str(shared / "wikitext-2" / "test.txt"), "--vocab-size", "500",
                             "--output", str(out), "--quiet"],
                            capture_output=True, text=True, env={**os.environ, **OFFLINE})
    assert result.returncode == 1, result.stderr
    assert "no space left on the device" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# Offline means offline: a Hub id fails at once, and nothing opens a socket on the way.


@pytest.fixture
def no_network(monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("the network is not allowed in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def test_hub_ids_fail_fast_without_touching_the_network(no_network, sst2, mlm_run, tmp_path):
    from llmkit.api import classify, evaluate, finetune, tokenize
    from llmkit.config import ClassifyConfig, EvaluateConfig, FinetuneConfig, TokenizeConfig, build_config

    calls = [
        (finetune, FinetuneConfig, dict(model="some-org/no-such-model", data=[str(sst2["train"])])),
        (finetune, FinetuneConfig, dict(model=str(mlm_run[0]), data=["some-org/no-such-dataset"])),
        (evaluate, EvaluateConfig, dict(model="bert-base-uncased", eval_data=[str(sst2["test"])])),
        (classify, ClassifyConfig, dict(model="some-org/no-such-model", texts=["hello"])),
        (tokenize, TokenizeConfig, dict(tokenizer="some-org/no-such-tokenizer", data=[str(sst2["train"])])),
    ]
    for function, cls, flags in calls:
        if "output" in cls.__dataclass_fields__:
            flags["output"] = str(tmp_path / "out")
        start = time.perf_counter()
        with pytest.raises(LlmkitError, match="the Hub is off"):
            function(build_config(cls, flags={**flags, "quiet": True}))
        assert time.perf_counter() - start < 10, f"{function.__name__} took long to fail offline"
    assert not no_network
    assert not (tmp_path / "out").exists()
