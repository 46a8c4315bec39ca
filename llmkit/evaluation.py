"""The one evaluation function (used during training and by `llmkit evaluate`) and the metrics.

Each process scores a contiguous, disjoint share of the examples (no padding, no duplicates), and the sums or
predictions are combined across processes, so 2 processes give the same numbers as 1. Masked-LM evaluation
masks every block with a generator seeded by (seed, block index): the same seed gives the same number.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from llmkit import display
from llmkit.data import shard
from llmkit.tasks import Masking, batch_loss

EVAL_SEED_OFFSET = 7_919  # evaluation masks differ from any training epoch's masks
# What classification_metrics computes: these names need no `evaluate` script from the Hub.
OFFLINE_METRICS = ("accuracy", "f1", "precision", "recall", "f1_macro", "f1_micro", "f1_weighted", "precision_macro",
                   "recall_macro", "matthews_correlation")


@torch.no_grad()
def evaluate_model(objective: str, model, data, accelerator, *, batch_size: int = 32, seed: int = 42,
                   masking: Masking | None = None, max_batches: int | None = None, multi_label: bool = False,
                   threshold: float | list[float] | str = 0.5, label_names: list[str] | None = None,
                   return_predictions: bool = False) -> dict[str, Any]:
    """Loss (and perplexity or classification metrics) of `model` on `data`. Multi-label `threshold`: one for all
    labels, one per label, or "auto" (each label's F1-maximising threshold on these examples)."""
    from accelerate.utils import gather_object

    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    indices = shard(len(data), rank, world)
    if max_batches is not None and max_batches * batch_size * world < len(data):
        # a sample spread over the whole set (the same at every evaluation, so that they compare), not its head:
        # data ordered by source or label would otherwise be scored on one kind of example only
        sample = np.sort(np.random.default_rng(seed).choice(len(data), max_batches * batch_size * world,
                                                            replace=False))
        indices = sample[shard(len(sample), rank, world)]
    lengths = data.lengths()
    if lengths is not None:  # longest first: less padding, and memory trouble shows at once
        indices = indices[np.argsort(-lengths[indices], kind="stable")]
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    item_count = torch.zeros((), dtype=torch.float64, device=device)
    outputs: list[tuple[int, list[float]]] = []
    n_batches = -(-len(indices) // batch_size)
    precision = {"no": "fp32"}.get(str(accelerator.mixed_precision), str(accelerator.mixed_precision))
    language_model = objective in ("clm", "mlm")
    seen = 0  # examples, or tokens for a language model, scored so far by this process
    with display.StepProgress("evaluate", n_batches, unit="batch", context=f"{device.type} {precision}") as shown:
        for number, start in enumerate(range(0, len(indices), batch_size), 1):
            idx = indices[start:start + batch_size]
            batch = data.batch(idx)
            if objective == "mlm":
                batch["masked_ids"], batch["mlm_labels"] = masking.rows(batch["input_ids"], idx,
                                                                        seed + EVAL_SEED_OFFSET)
            seen += batch["input_ids"].numel() if language_model else len(idx)
            batch = {k: v.to(device) for k, v in batch.items()}
            with accelerator.autocast():
                loss, items, logits = batch_loss(objective, model, batch, multi_label=multi_label)
            loss_sum += loss.double()
            item_count += items.double().to(device)
            if logits is not None:
                outputs.extend(zip(idx.tolist(), logits.float().cpu().tolist()))
            figures = {}
            if shown.due(final=number == n_batches):  # a few times a second: the loss waits for the device
                seconds = max(time.perf_counter() - shown.start, 1e-9)
                figures = {"loss": loss_sum.item() / max(item_count.item(), 1),
                           "tok/s" if language_model else "samples/s": seen / seconds}
            shown.update(number, **figures)
    if world > 1:
        loss_sum = accelerator.reduce(loss_sum, reduction="sum")
        item_count = accelerator.reduce(item_count, reduction="sum")
    metrics: dict[str, Any] = {}
    if item_count.item() > 0:
        metrics["loss"] = loss_sum.item() / item_count.item()
    if objective in ("clm", "mlm"):
        metrics["perplexity"] = math.exp(min(metrics.get("loss", float("nan")), 700))
        metrics["tokens"] = int(item_count.item())
        return metrics
    if world > 1:
        outputs = gather_object(outputs)
    outputs.sort(key=lambda pair: pair[0])
    logits = np.asarray([o[1] for o in outputs], dtype=np.float64)
    order = np.asarray([o[0] for o in outputs], dtype=np.int64)
    labels = data.labels_at(order) if data.has_labels else None
    if multi_label:
        threshold = decision_thresholds(threshold, logits, labels)
        names = label_names or [str(i) for i in range(logits.shape[1])]
        metrics["thresholds"] = dict(zip(names, threshold.tolist()))
    predictions = predict_from_logits(logits, multi_label, threshold)
    if labels is not None:
        metrics.update(classification_metrics(labels, predictions, label_names, multi_label))
    if return_predictions:
        metrics["_predictions"] = (order, logits, predictions)
    return metrics


def predict_from_logits(logits: np.ndarray, multi_label: bool, threshold: float | np.ndarray = 0.5) -> np.ndarray:
    """Class ids (single-label), or 0/1 per label: a label is on when its probability reaches its threshold."""
    if multi_label:
        return (sigmoid(logits) >= threshold).astype(np.int64)
    return logits.argmax(axis=-1)


def saved_thresholds(config, names: list[str]) -> list[float]:
    """The per-label thresholds a multi-label classifier was saved with (config.llmkit_thresholds, written by
    `llmkit finetune`); 0.5 for a label without one, as for classifiers trained elsewhere."""
    saved = getattr(config, "llmkit_thresholds", None) or {}
    return [float(saved.get(name, 0.5)) for name in names]


def sigmoid(logits: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp overflows for very negative logits: the probability is then 0
        return 1 / (1 + np.exp(-logits))


def decision_thresholds(threshold: float | list[float] | str, logits: np.ndarray,
                        labels: np.ndarray | None) -> np.ndarray:
    """One threshold per label: the given one(s), or under "auto" each label's F1-maximising threshold on these
    examples (0.5 when there are no labels to tune on)."""
    n_labels = logits.shape[1]
    if not isinstance(threshold, str):
        return np.broadcast_to(np.asarray(threshold, dtype=np.float64), (n_labels,)).copy()
    if labels is None or len(labels) == 0:
        return np.full(n_labels, 0.5)
    probs = sigmoid(logits)
    return np.array([best_f1_threshold(probs[:, j], np.asarray(labels)[:, j]) for j in range(n_labels)])


def best_f1_threshold(scores: np.ndarray, gold: np.ndarray) -> float:
    """The threshold that maximises F1 of one label. The examples at or above it are the top k by score for the
    best k; it lies halfway between the k-th score and the next lower one, so that scores close to the cut (of
    texts not seen here) fall on the side they are nearer to. A label without positive examples keeps 0.5."""
    positives = float(gold.sum())
    if positives == 0:
        return 0.5
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    true_positives = np.cumsum(gold[order])
    f1 = 2 * true_positives / (np.arange(1, len(ranked) + 1) + positives)
    below = np.append(ranked[1:], 0.0)
    f1[ranked == below] = -1.0  # no threshold separates equal scores: cut only where the score drops
    k = int(np.argmax(f1))
    return float((ranked[k] + below[k]) / 2)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _prf(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 per class, with 0 where undefined (scikit-learn's zero_division=0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    return precision, recall, f1


def _matthews(confusion: np.ndarray) -> float:
    """Matthews correlation of a confusion matrix (rows: gold, columns: predicted), 0 where undefined."""
    confusion = confusion.astype(np.float64)
    gold, predicted, n = confusion.sum(axis=1), confusion.sum(axis=0), confusion.sum()
    covariance = np.trace(confusion) * n - gold @ predicted
    spread = (n * n - predicted @ predicted) * (n * n - gold @ gold)
    return float(covariance / np.sqrt(spread)) if spread > 0 else 0.0


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, names: list[str] | None = None,
                           multi_label: bool = False) -> dict[str, Any]:
    """Accuracy, F1, precision, recall, Matthews correlation and per-class figures (and the confusion matrix for
    single-label), with scikit-learn's definitions (tests compare against it). `f1`, `precision` and `recall`
    are what the `evaluate` library's metrics of those names give: of the positive class (label id 1) when there
    are two classes (average="binary", their default), else macro averages (evaluate needs an average then).
    Multi-label `matthews_correlation` is the mean of the labels' own."""
    labels = np.asarray(labels)
    predictions = np.asarray(predictions)
    if multi_label:
        labels = labels.astype(np.int64)
        n_classes = labels.shape[1]
        tp = ((predictions == 1) & (labels == 1)).sum(axis=0).astype(float)
        fp = ((predictions == 1) & (labels == 0)).sum(axis=0).astype(float)
        fn = ((predictions == 0) & (labels == 1)).sum(axis=0).astype(float)
        accuracy = float((predictions == labels).all(axis=1).mean())  # exact match (subset accuracy)
        tn = len(labels) - tp - fp - fn
        matthews = float(np.mean([_matthews(np.array([[tn[j], fp[j]], [fn[j], tp[j]]])) for j in range(n_classes)]))
        confusion = None
    else:
        n_classes = len(names) if names else int(max(labels.max(), predictions.max()) + 1)
        confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
        np.add.at(confusion, (labels, predictions), 1)
        tp = np.diag(confusion).astype(float)
        fp = confusion.sum(axis=0) - tp
        fn = confusion.sum(axis=1) - tp
        accuracy = float(tp.sum() / max(len(labels), 1))
        matthews = _matthews(confusion)
    precision, recall, f1 = _prf(tp, fp, fn)
    present = (tp + fn > 0) | (tp + fp > 0)  # scikit-learn averages over labels present in either
    if multi_label:
        present = np.ones(n_classes, dtype=bool)
    _, _, f1_micro = _prf(tp.sum(keepdims=True), fp.sum(keepdims=True), fn.sum(keepdims=True))
    support = tp + fn
    names = names or [str(i) for i in range(n_classes)]
    macro = {"f1": float(f1[present].mean()) if present.any() else 0.0,
             "precision": float(precision[present].mean()), "recall": float(recall[present].mean())}
    binary = not multi_label and n_classes == 2
    metrics: dict[str, Any] = {"accuracy": accuracy,
                               "f1": float(f1[1]) if binary else macro["f1"],
                               "precision": float(precision[1]) if binary else macro["precision"],
                               "recall": float(recall[1]) if binary else macro["recall"],
                               "f1_macro": macro["f1"], "f1_micro": float(f1_micro[0]),
                               "f1_weighted": float(f1 @ support / support.sum()) if support.sum() else 0.0,
                               "precision_macro": macro["precision"], "recall_macro": macro["recall"],
                               "matthews_correlation": matthews, "examples": int(len(labels))}
    metrics["per_class"] = {names[i]: {"precision": float(precision[i]), "recall": float(recall[i]),
                                       "f1": float(f1[i]), "support": int(support[i])} for i in range(n_classes)}
    if confusion is not None:
        metrics["confusion_matrix"] = confusion.tolist()
    return metrics


def hub_metric(name: str, predictions: np.ndarray, references: np.ndarray,
               trust_remote_code: bool = False) -> dict[str, Any]:
    """A metric by name from the `evaluate` library (needs the Hub for its script unless cached). The script is
    Python code that runs here, so it is loaded only with --trust-remote-code."""
    import evaluate

    from llmkit.errors import LlmkitError, UsageError
    from llmkit.hub import offline

    built_in = ", ".join(OFFLINE_METRICS)
    if offline():
        raise LlmkitError(f"metric {name!r} is not built in and the Hub is off (HF_HUB_OFFLINE is set): use one of "
                          f"{built_in}, or go online to load it")
    if not trust_remote_code:
        raise UsageError(f"metric {name!r} is a Python script from the Hub that would run here: pass "
                         f"--trust-remote-code to allow it, or use one of {built_in}")
    try:
        metric = evaluate.load(name)
    except Exception as e:  # evaluate raises many types for a missing metric
        raise LlmkitError(f"could not load metric {name!r} from the Hub: {str(e).splitlines()[0]}") from None
    return metric.compute(predictions=predictions.tolist(), references=references.tolist())
