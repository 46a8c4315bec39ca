"""Fine-tuning, evaluation and classification on real data slices."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import write_topics

from llmkit.api import classify, evaluate, finetune
from llmkit.config import ClassifyConfig, EvaluateConfig, FinetuneConfig, build_config
from llmkit.errors import UsageError


def _finetune(**flags):
    base = dict(quiet=True, log_every=5, seed=0)
    base.update(flags)
    return finetune(build_config(FinetuneConfig, flags=base))


@pytest.fixture(scope="module")
def minilm_sst2(minilm, sst2, tmp_path_factory):
    out = tmp_path_factory.mktemp("cls") / "minilm-sst2"
    metrics = _finetune(model=str(minilm), data=[str(sst2["train"])], eval_data=[str(sst2["test"])],
                        output=str(out), epochs=2, global_batch_size=16)  # 1 epoch of 600 rows: 0.52-0.72
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
    from sklearn.metrics import (accuracy_score, confusion_matrix, f1_score, matthews_corrcoef, precision_score,
                                 recall_score)

    out, _ = minilm_sst2
    predictions = tmp_path / "pred.jsonl"
    metrics = evaluate(build_config(EvaluateConfig, flags=dict(  # the Hub is off: these names must be built in
        model=str(out), eval_data=[str(sst2["test"])], predictions=str(predictions), precision="fp32", quiet=True,
        metric=["f1", "precision", "recall", "f1_weighted", "matthews_correlation"])))
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    gold = [r["gold"] for r in rows]
    pred = [r["label"] for r in rows]
    assert metrics["accuracy"] == pytest.approx(accuracy_score(gold, pred))
    assert metrics["f1_macro"] == pytest.approx(f1_score(gold, pred, average="macro"))
    assert metrics["f1_micro"] == pytest.approx(f1_score(gold, pred, average="micro"))
    # `evaluate`'s f1/precision/recall of two classes: average="binary", positive class = label id 1 ("1" here)
    assert metrics["f1"] == pytest.approx(f1_score(gold, pred, pos_label="1"))
    assert metrics["precision"] == pytest.approx(precision_score(gold, pred, pos_label="1"))
    assert metrics["recall"] == pytest.approx(recall_score(gold, pred, pos_label="1"))
    assert metrics["f1_weighted"] == pytest.approx(f1_score(gold, pred, average="weighted"))
    assert metrics["matthews_correlation"] == pytest.approx(matthews_corrcoef(gold, pred))
    assert metrics["confusion_matrix"] == confusion_matrix(gold, pred, labels=["0", "1"]).tolist()


def test_metrics_match_scikit_learn_binary_multiclass_and_multilabel():
    from sklearn.metrics import f1_score, matthews_corrcoef, precision_score, recall_score

    from llmkit.evaluation import classification_metrics

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 400), rng.integers(0, 2, 400)
    p[:300] = y[:300]  # better than chance, so that the correlation is not ~0
    m = classification_metrics(y, p, ["neg", "pos"])  # `evaluate`'s defaults: average="binary", pos_label=1
    assert m["f1"] == pytest.approx(f1_score(y, p))
    assert m["precision"] == pytest.approx(precision_score(y, p))
    assert m["recall"] == pytest.approx(recall_score(y, p))
    assert m["f1_weighted"] == pytest.approx(f1_score(y, p, average="weighted"))
    assert m["matthews_correlation"] == pytest.approx(matthews_corrcoef(y, p))
    assert classification_metrics(y, np.zeros_like(y), ["neg", "pos"])["f1"] == 0.0  # never predicts the positive

    y, p = rng.integers(0, 4, 500), rng.integers(0, 4, 500)
    p[p == 3] = 2  # a class never predicted
    m = classification_metrics(y, p, ["a", "b", "c", "d"])
    for name, score in (("f1", f1_score), ("precision", precision_score), ("recall", recall_score)):
        macro = score(y, p, average="macro", zero_division=0)  # `evaluate` needs an average here: llmkit's is macro
        assert m[name] == pytest.approx(macro) and m[f"{name}_macro"] == pytest.approx(macro)
    assert m["f1_weighted"] == pytest.approx(f1_score(y, p, average="weighted", zero_division=0))
    assert m["matthews_correlation"] == pytest.approx(matthews_corrcoef(y, p))
    assert classification_metrics(y, np.zeros_like(y), list("abcd"))["matthews_correlation"] == 0.0  # undefined

    Y, P = rng.integers(0, 2, (300, 5)), rng.integers(0, 2, (300, 5))
    P[:200] = Y[:200]
    P[:, 4] = 0  # a label never predicted
    m = classification_metrics(Y, P, list("vwxyz"), multi_label=True)
    assert m["f1_macro"] == pytest.approx(f1_score(Y, P, average="macro", zero_division=0))
    assert m["f1_micro"] == pytest.approx(f1_score(Y, P, average="micro", zero_division=0))
    for name, score in (("f1", f1_score), ("precision", precision_score), ("recall", recall_score)):
        assert m[name] == pytest.approx(score(Y, P, average="macro", zero_division=0))
    assert m["f1_weighted"] == pytest.approx(f1_score(Y, P, average="weighted", zero_division=0))
    per_label = [matthews_corrcoef(Y[:, j], P[:, j]) for j in range(5)]
    assert m["matthews_correlation"] == pytest.approx(np.mean(per_label))


def test_auto_threshold_maximises_each_labels_f1():
    from sklearn.metrics import f1_score

    from llmkit.evaluation import decision_thresholds, sigmoid

    rng = np.random.default_rng(3)
    gold = rng.integers(0, 2, (200, 3))
    logits = gold * rng.normal(1.0, 1.5, (200, 3)) - (1 - gold) * rng.normal(0.5, 1.5, (200, 3))
    gold[:, 2] = 0  # a label without positive examples keeps 0.5
    tuned = decision_thresholds("auto", logits, gold)
    assert tuned[2] == 0.5
    probs = sigmoid(logits)
    for j in range(2):
        best = max(f1_score(gold[:, j], probs[:, j] >= t) for t in probs[:, j])  # every cut there is
        assert f1_score(gold[:, j], probs[:, j] >= tuned[j]) == pytest.approx(best)
    assert decision_thresholds("auto", logits, None).tolist() == [0.5] * 3  # nothing to tune on
    assert decision_thresholds([0.2, 0.4, 0.6], logits, gold).tolist() == [0.2, 0.4, 0.6]


def test_string_labels_multiclass_from_llmkit_pretrained_model(mlm_run, tmp_path):
    run, _ = mlm_run
    data = write_topics(tmp_path / "topics.csv")
    out = tmp_path / "topics"
    metrics = _finetune(model=str(run), data=[str(data)], output=str(out), epochs=3, learning_rate=3e-3,
                        global_batch_size=16, validation_split=0.2)
    assert metrics["eval_accuracy"] > 0.6  # three classes: chance is 1/3
    results = classify(build_config(ClassifyConfig, flags=dict(texts=["the battle came", "the queen went"],
                                                               model=str(out), quiet=True, top_k=3)))
    assert {r["label"] for r in results} <= {"weather", "court", "war"}
    assert len(results[0]["top_k"]) == 3


def _tags(path, rows: int = 240):
    tags = {"storm": ["weather"], "crown": ["court"], "siege": ["war"], "thunder": ["weather", "war"]}
    rng = np.random.default_rng(1)
    texts = [f"a {rng.choice(list(tags))} over the hills" for _ in range(rows)]
    with open(path, "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text, "labels": tags[text.split()[1]]}) + "\n")
    return texts


def _above_thresholds(results, thresholds):
    """The labels whose score reaches their threshold, from classify's top_k (all labels)."""
    return [sorted(x["label"] for x in r["top_k"] if x["score"] >= thresholds[x["label"]]) for r in results]


def test_multi_label_auto_thresholds_round_trip_into_classify_and_evaluate(minilm, tmp_path):
    data = tmp_path / "tags.jsonl"
    texts = _tags(data)
    out = tmp_path / "tags"
    metrics = _finetune(model=str(minilm), data=[str(data)], output=str(out), multi_label=True, threshold="auto",
                        epochs=3, learning_rate=1e-3, global_batch_size=16, validation_split=0.25, metric="f1")
    assert metrics["eval_f1_micro"] > 0.6 and "best_f1" in metrics
    config = json.loads((out / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    assert sorted(config["label2id"]) == ["court", "war", "weather"]
    thresholds = config["llmkit_thresholds"]  # tuned on the last evaluation, and saved with the model
    assert thresholds == metrics["eval_thresholds"] and sorted(thresholds) == ["court", "war", "weather"]
    assert sorted(json.loads((out / "best" / "config.json").read_text())["llmkit_thresholds"]) == sorted(thresholds)

    results = classify(build_config(ClassifyConfig, flags=dict(texts=texts[:40], model=str(out), top_k=3,
                                                               precision="fp32", quiet=True)))
    assert [sorted(r["labels"]) for r in results] == _above_thresholds(results, thresholds)
    predictions = tmp_path / "pred.jsonl"
    scored = evaluate(build_config(EvaluateConfig, flags=dict(model=str(out), eval_data=[str(data)], max_samples=40,
                                                              predictions=str(predictions), precision="fp32",
                                                              quiet=True)))
    assert scored["thresholds"] == thresholds
    rows = sorted((json.loads(line) for line in predictions.read_text().splitlines()), key=lambda r: r["index"])
    assert [sorted(r["labels"]) for r in rows] == [sorted(r["labels"]) for r in results]


def test_multi_label_thresholds_per_label(minilm, tmp_path):
    data = tmp_path / "tags.jsonl"
    texts = _tags(data, rows=32)
    out = tmp_path / "tags"
    flags = dict(model=str(minilm), data=[str(data)], output=str(out), multi_label=True, max_steps=2,
                 global_batch_size=16, validation_split=0)
    with pytest.raises(UsageError, match="gives 2 numbers for 3 labels: give one, or one per label in this order: "
                                         "court, war, weather"):
        _finetune(**flags, threshold="0.3,0.6")
    with pytest.raises(UsageError, match="--threshold applies to --multi-label"):
        _finetune(**{**flags, "multi_label": False}, threshold="0.3")
    with pytest.raises(UsageError, match="give `auto`, a number, or one number per label"):
        _finetune(**flags, threshold="high")
    _finetune(**flags, threshold="0.2, 0.5,0.8")
    thresholds = json.loads((out / "config.json").read_text())["llmkit_thresholds"]
    assert thresholds == {"court": 0.2, "war": 0.5, "weather": 0.8}
    results = classify(build_config(ClassifyConfig, flags=dict(texts=texts[:8], model=str(out), top_k=3,
                                                               quiet=True)))
    assert [sorted(r["labels"]) for r in results] == _above_thresholds(results, thresholds)


def test_classlabel_names_become_the_labels(minilm, tmp_path):
    import datasets

    from llmkit import data as pipeline
    from llmkit.tokenizer import load_tokenizer

    topics = ["World", "Sports", "Business", "Sci/Tech"]  # ag_news's ClassLabel: not in alphabetical order
    words = ["war", "match", "market", "chip"]
    rows = {"text": [f"news of the {words[i % 4]} today" for i in range(48)], "label": [i % 4 for i in range(48)]}
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=topics)})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "news"))
    out = tmp_path / "news-model"
    metrics = _finetune(model=str(minilm), data=[str(tmp_path / "news")], output=str(out), max_steps=2,
                        global_batch_size=16, validation_split=0.25, metric="matthews_correlation")
    assert "best_matthews_correlation" in metrics
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(topics)}  # the dataset's ids and names
    scored = evaluate(build_config(EvaluateConfig, flags=dict(model=str(out), data=[str(tmp_path / "news")],
                                                              split="train", quiet=True)))
    assert list(scored["per_class"]) == topics and scored["examples"] == 48

    tagged = datasets.Features({"text": datasets.Value("string"),
                                "labels": datasets.Sequence(datasets.ClassLabel(names=["sad", "happy"]))})
    datasets.Dataset.from_dict({"text": ["a", "b", "c"], "labels": [[1], [0, 1], []]}, features=tagged) \
        .save_to_disk(str(tmp_path / "moods"))
    dataset, labels = pipeline.prepare_classification(
        [str(tmp_path / "moods")], load_tokenizer(str(minilm)), None, text_column=None, text_pair_column=None,
        label_column=None, max_length=16, multi_label=True)
    assert labels.names == ["sad", "happy"]
    assert [list(row) for row in dataset["labels"]] == [[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]


def test_finetune_has_no_token_budget():
    with pytest.raises(UsageError, match="unknown setting `max_tokens`"):  # classifiers count steps or epochs
        build_config(FinetuneConfig, flags=dict(model="m", data=["d.csv"], output="o", max_tokens=1000))


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


def test_classify_names_an_argument_that_is_not_utf8(minilm_sst2):
    out, _ = minilm_sst2
    proc = subprocess.run([sys.executable, "-m", "llmkit", "classify", "fine", b"caf\xe9 cr\xe8me", "--model",
                           str(out)], capture_output=True)  # Python turns the bytes into surrogate escapes
    assert proc.returncode == 1, proc.stderr
    assert b"text argument 2 ('caf" in proc.stderr and b"is not valid UTF-8" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and b"internal error" not in proc.stderr


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


def test_evaluation_with_a_batch_budget_scores_a_spread_of_the_data(minilm_sst2, sst2):
    """--eval-batches picks the same examples at every evaluation, spread over the whole set: on data ordered by
    label (all negatives first) a budget of two batches still sees both labels."""
    import datasets
    from accelerate import Accelerator
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llmkit.data import LabeledExamples
    from llmkit.evaluation import evaluate_model

    out, _ = minilm_sst2
    tokenizer = AutoTokenizer.from_pretrained(out)
    rows = [line.split("\t") for line in sst2["test"].read_text().splitlines()[1:]]
    rows.sort(key=lambda r: int(r[1]))
    data = datasets.Dataset.from_dict({"input_ids": tokenizer([r[0] for r in rows])["input_ids"],
                                       "labels": [int(r[1]) for r in rows]})
    model = AutoModelForSequenceClassification.from_pretrained(out)
    examples = LabeledExamples(data, tokenizer.pad_token_id)
    runs = [evaluate_model("classification", model, examples, Accelerator(cpu=True), batch_size=8, max_batches=2,
                           return_predictions=True)["_predictions"][0] for _ in range(2)]
    assert len(runs[0]) == 16 and sorted(runs[0]) == sorted(runs[1])
    assert set(examples.labels_at(runs[0])) == {0, 1}
    assert max(runs[0]) - min(runs[0]) > len(rows) // 2


@pytest.mark.parametrize("architecture", ["bert", "roberta", "electra"])
@pytest.mark.parametrize("attention", ["sdpa", "eager", "llmkit_cpu", "checkpointed"])
def test_first_token_head_gives_the_whole_layers_logits_and_gradients(architecture, attention):
    """The last layer computed at the first position only: the same logits and gradients as the whole layer,
    with padding in the batch and with none, and it takes effect (the last hidden state keeps one position).
    With SDPA, eager attention and llmkit's CPU attention; and in training mode with gradient checkpointing
    (no dropout, so that both models compute the same)."""
    import copy

    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from llmkit.tasks import use_fast_attention, use_first_token_head

    config = AutoConfig.for_model(architecture, vocab_size=120, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=40,
                                  num_labels=3, attn_implementation="eager" if attention == "eager" else "sdpa",
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  **({"embedding_size": 32} if architecture == "electra" else {}))
    torch.manual_seed(0)
    whole = AutoModelForSequenceClassification.from_config(config).eval()
    first = AutoModelForSequenceClassification.from_config(copy.deepcopy(config)).eval()
    first.load_state_dict(whole.state_dict())
    if attention == "llmkit_cpu":
        assert use_fast_attention(whole) and use_fast_attention(first)
    if attention == "checkpointed":
        for m in (whole, first):
            m.gradient_checkpointing_enable()
            m.train()
    assert use_first_token_head(first)
    ids = torch.randint(5, 120, (3, 11))
    for mask in (torch.ones_like(ids), torch.tensor([[1] * 11, [1] * 6 + [0] * 5, [1] * 2 + [0] * 9])):
        logits = [m(input_ids=ids, attention_mask=mask).logits for m in (whole, first)]
        torch.testing.assert_close(logits[1], logits[0])
        for m, out in zip((whole, first), logits):
            m.zero_grad()
            out.square().sum().backward()
        for (name, a), b in zip(whole.named_parameters(), first.parameters()):
            torch.testing.assert_close(b.grad, a.grad, msg=name)
    hidden = first.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert hidden.shape[1] == 1


def test_first_token_head_leaves_other_classifiers_alone():
    import torch
    from transformers import AutoModelForSequenceClassification, GPT2Config

    from llmkit.tasks import use_first_token_head

    gpt2 = AutoModelForSequenceClassification.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50,
                                                                     pad_token_id=0))
    assert not use_first_token_head(gpt2)  # reads the last token
    assert torch.is_tensor(gpt2(input_ids=torch.ones(1, 4, dtype=torch.long)).logits)
