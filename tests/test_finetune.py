"""Fine-tuning, evaluation and classification on real data slices."""

import json
import subprocess
import sys

import numpy as np
import pytest

from llmkit.api import classify, evaluate, finetune
from llmkit.config import ClassifyConfig, EvaluateConfig, FinetuneConfig, build_config


def _finetune(**flags):
    base = dict(quiet=True, log_every=5, seed=0)
    base.update(flags)
    return finetune(build_config(FinetuneConfig, flags=base))


@pytest.fixture(scope="module")
def minilm_sst2(minilm, sst2, tmp_path_factory):
    out = tmp_path_factory.mktemp("cls") / "minilm-sst2"
    metrics = _finetune(model=str(minilm), data=[str(sst2["train"])], eval_data=[str(sst2["test"])],
                        output=str(out), epochs=1, global_batch_size=16)
    return out, metrics


def test_minilm_on_sst2_beats_chance(minilm_sst2):
    out, metrics = minilm_sst2
    assert metrics["eval_accuracy"] > 0.7, metrics  # 300 held-out rows: chance is ~0.5
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "0", "1": "1"}


def test_pipeline_gives_the_same_labels_as_classify(minilm_sst2, sst2):
    from transformers import pipeline

    out, _ = minilm_sst2
    texts = [line.split("\t")[0] for line in sst2["test"].read_text().splitlines()[1:41]]
    ours = classify(build_config(ClassifyConfig, flags=dict(texts=texts, model=str(out), precision="fp32",
                                                            quiet=True)))
    theirs = pipeline("text-classification", model=str(out), device="cpu")(texts)
    assert [r["label"] for r in ours] == [r["label"] for r in theirs]
    assert np.allclose([r["score"] for r in ours], [r["score"] for r in theirs], atol=1e-4)


def test_evaluate_metrics_match_scikit_learn(minilm_sst2, sst2, tmp_path):
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    out, _ = minilm_sst2
    predictions = tmp_path / "pred.jsonl"
    metrics = evaluate(build_config(EvaluateConfig, flags=dict(model=str(out), eval_data=[str(sst2["test"])],
                                                               predictions=str(predictions), precision="fp32",
                                                               quiet=True)))
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    gold = [r["gold"] for r in rows]
    pred = [r["label"] for r in rows]
    assert metrics["accuracy"] == pytest.approx(accuracy_score(gold, pred))
    assert metrics["f1_macro"] == pytest.approx(f1_score(gold, pred, average="macro"))
    assert metrics["f1_micro"] == pytest.approx(f1_score(gold, pred, average="micro"))
    assert metrics["confusion_matrix"] == confusion_matrix(gold, pred, labels=["0", "1"]).tolist()


def test_metrics_match_scikit_learn_multiclass_and_multilabel():
    from sklearn.metrics import f1_score, precision_score, recall_score

    from llmkit.evaluation import classification_metrics

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 4, 500), rng.integers(0, 4, 500)
    p[p == 3] = 2  # a class never predicted
    m = classification_metrics(y, p, ["a", "b", "c", "d"])
    assert m["f1_macro"] == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
    assert m["precision_macro"] == pytest.approx(precision_score(y, p, average="macro", zero_division=0))
    assert m["recall_macro"] == pytest.approx(recall_score(y, p, average="macro", zero_division=0))
    Y, P = rng.integers(0, 2, (300, 5)), rng.integers(0, 2, (300, 5))
    m = classification_metrics(Y, P, list("vwxyz"), multi_label=True)
    assert m["f1_macro"] == pytest.approx(f1_score(Y, P, average="macro", zero_division=0))
    assert m["f1_micro"] == pytest.approx(f1_score(Y, P, average="micro", zero_division=0))


def test_string_labels_multiclass_from_llmkit_pretrained_model(mlm_run, tmp_path):
    run, _ = mlm_run
    rows = ["text,label"]
    words = {"sun": "weather", "rain": "weather", "king": "court", "queen": "court", "sword": "war", "battle": "war"}
    rng = np.random.default_rng(0)
    for _ in range(300):
        w = rng.choice(list(words))
        rows.append(f"the {w} came and the {w} went,{words[w]}")
    data = tmp_path / "topics.csv"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "topics"
    metrics = _finetune(model=str(run), data=[str(data)], output=str(out), epochs=3, learning_rate=3e-3,
                        global_batch_size=16, validation_split=0.2)
    assert metrics["eval_accuracy"] > 0.6  # three classes: chance is 1/3
    results = classify(build_config(ClassifyConfig, flags=dict(texts=["the battle came", "the queen went"],
                                                               model=str(out), quiet=True, top_k=3)))
    assert {r["label"] for r in results} <= {"weather", "court", "war"}
    assert len(results[0]["top_k"]) == 3


def test_multi_label_json_lists(minilm, tmp_path):
    tags = {"storm": ["weather"], "crown": ["court"], "siege": ["war"], "thunder": ["weather", "war"]}
    rng = np.random.default_rng(1)
    with open(tmp_path / "tags.jsonl", "w") as f:
        for _ in range(240):
            w = rng.choice(list(tags))
            f.write(json.dumps({"text": f"a {w} over the hills", "labels": tags[w]}) + "\n")
    out = tmp_path / "tags"
    metrics = _finetune(model=str(minilm), data=[str(tmp_path / "tags.jsonl")], output=str(out), multi_label=True,
                        epochs=3, learning_rate=1e-3, global_batch_size=16, validation_split=0.25,
                        metric="f1_micro")
    assert metrics["eval_f1_micro"] > 0.6
    config = json.loads((out / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    assert sorted(config["label2id"]) == ["court", "war", "weather"]


def test_classify_text_file_and_stdin_with_json(minilm_sst2, tmp_path):
    out, _ = minilm_sst2
    texts = tmp_path / "texts.txt"
    texts.write_text("a masterpiece\nutterly boring\n")
    proc = subprocess.run([sys.executable, "-m", "llmkit", "classify", "-", "a gem", "--file", str(texts), "--model",
                           str(out), "--json"], input="what a waste of time\n", capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["what a waste of time", "a gem", "a masterpiece", "utterly boring"]
    assert all(r["label"] in ("0", "1") and 0.5 <= r["score"] <= 1 for r in rows)
    proc = subprocess.run([sys.executable, "-m", "llmkit", "classify", "-", "--model", str(out)],
                          input=b"fine\n\xff\xfe bad bytes\n", capture_output=True)
    assert proc.returncode == 1
    assert b"stdin, line 2: not valid UTF-8" in proc.stderr and b"Traceback" not in proc.stderr


def test_classify_empty_and_long_texts(minilm_sst2):
    out, _ = minilm_sst2
    results = classify(build_config(ClassifyConfig, flags=dict(texts=["", "great " * 2000], model=str(out),
                                                               quiet=True)))
    assert results[0]["truncated"] is False and results[1]["truncated"] is True


def test_evaluate_is_deterministic_for_mlm(mlm_run, shared):
    run, _ = mlm_run
    flags = dict(model=str(run), eval_data=[str(shared / "wikitext-2" / "valid.txt")], max_samples=200, quiet=True,
                 precision="fp32")
    a = evaluate(build_config(EvaluateConfig, flags=flags))
    b = evaluate(build_config(EvaluateConfig, flags=flags))
    c = evaluate(build_config(EvaluateConfig, flags={**flags, "seed": 7}))
    assert a["loss"] == b["loss"] and a["tokens"] == b["tokens"]
    assert a["loss"] != c["loss"]


def test_evaluate_clm_perplexity(clm_run, shakespeare):
    run, metrics = clm_run
    scored = evaluate(build_config(EvaluateConfig, flags=dict(model=str(run), data=[str(shakespeare)], quiet=True,
                                                              precision="fp32")))
    assert scored["perplexity"] == pytest.approx(np.exp(scored["loss"]))
    assert scored["loss"] == pytest.approx(metrics["eval_loss"], rel=1e-6)  # the same held-out part as training
