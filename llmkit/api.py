"""The Python API: one function per command, each taking its typed settings. The CLI only parses and calls these.

    from llmkit.api import pretrain
    from llmkit.config import PretrainConfig
    pretrain(PretrainConfig(data=["corpus.txt"], output="runs/lm", objective="clm", max_steps=100))
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator, TextIO

from llmkit import display
from llmkit.config import (ClassifyConfig, EnvConfig, EvaluateConfig, FillConfig, FinetuneConfig, GenerateConfig,
                           PlotConfig, PretrainConfig, RecipesConfig, TokenizeConfig, to_dict)
from llmkit.errors import LlmkitError, UsageError


def _quiet_libraries(verbose: bool) -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if not verbose:
        transformers.utils.logging.set_verbosity_error()
    # datasets costs ~0.5 s to import and classify/generate/fill never need it: set what it reads on import
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if not verbose:
        os.environ.setdefault("DATASETS_VERBOSITY", "error")
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
        if not verbose:
            datasets.utils.logging.set_verbosity_error()


def _setup(cfg: Any) -> None:
    display.configure(cfg.quiet, cfg.verbose)
    _quiet_libraries(cfg.verbose)


def _main_first():
    """A context in which each machine's first process goes first (building caches) and the others then read
    them: once per machine, so machines that do not share a file system each build their own cache (the cache
    is content-addressed and built by rename, so machines that do share one may race but never corrupt it)."""
    import torch
    from accelerate import PartialState

    # cpu=True on machines without CUDA: processes started by the launcher then form a gloo group (multi-CPU).
    return PartialState(cpu=not torch.cuda.is_available()).local_main_process_first()


# ---------------------------------------------------------------------------------------------------------------
# tokenize


def tokenize(cfg: TokenizeConfig) -> dict[str, Any]:
    """Train a tokenizer (or load one) and pre-tokenize --data into OUTPUT/data."""
    from llmkit import data as pipeline
    from llmkit import sources as src
    from llmkit.tokenizer import load_tokenizer, train_tokenizer

    _setup(cfg)
    start = time.perf_counter()
    output = Path(cfg.output)
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file: give a directory")
    pipeline.check_replaceable(output / "data")
    sources = src.resolve(cfg.data)
    src.resolve(cfg.eval_data, "--eval-data")  # a missing file fails now, not after training the tokenizer
    if cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer, cfg.trust_remote_code)
    else:
        display.info(f"training a {cfg.tokenizer_type} tokenizer of {cfg.vocab_size} tokens on {', '.join(cfg.data)}")
        batches = src.iter_text_batches(sources, cfg.text_column, cfg.sample_by,
                                        trust_remote_code=cfg.trust_remote_code)
        tokenizer = train_tokenizer(batches, cfg.tokenizer_type, cfg.vocab_size, cfg.min_frequency, cfg.lowercase,
                                    cfg.model_max_length)
    trained_in = time.perf_counter() - start
    created = not output.exists()
    try:
        output.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(output)
        corpus = pipeline.tokenize_corpus(cfg.data, tokenizer, eval_data=cfg.eval_data,  # shows its progress
                                          validation_split=cfg.validation_split if not cfg.eval_data else 0.0,
                                          text_column=cfg.text_column, sample_by=cfg.sample_by,
                                          max_samples=cfg.max_samples, output=output / "data",
                                          trust_remote_code=cfg.trust_remote_code)
    except BaseException:
        if created:  # a failed command leaves no half-written output behind
            shutil.rmtree(output, ignore_errors=True)
        raise
    info = corpus.info
    summary = {"output": str(output), "vocab_size": len(tokenizer), "documents": info["documents"],
               "tokens": info["tokens"], "blocks": info["tokens"] // cfg.block_size, "block_size": cfg.block_size,
               "validation_documents": info["validation_documents"], "validation_tokens": info["validation_tokens"],
               "tokenizer_seconds": round(trained_in, 3), "tokenize_seconds": info["seconds"],
               "tokens_per_second": info["tokens_per_second"]}
    return summary


# ---------------------------------------------------------------------------------------------------------------
# pretrain


def default_pretrain_lr(hidden: int, continuing: bool) -> float:
    """Smaller models take larger steps (nanoGPT's 6x384 Shakespeare model uses 1e-3, GPT-2 small 6e-4);
    continued pretraining starts from a good point and should not jump far from it."""
    if continuing:
        return 5e-5
    return 1e-3 if hidden <= 384 else 6e-4 if hidden <= 768 else 3e-4


def _hidden_size(model) -> int:
    config = model.config
    return int(getattr(config, "hidden_size", None) or getattr(config, "n_embd", 768))


def _tokenizer_for_pretraining(cfg: PretrainConfig):
    """--tokenizer, else the tokenizer beside pre-tokenized --data, else one trained on --data (cached)."""
    from llmkit import data as pipeline
    from llmkit import sources as src
    from llmkit.tokenizer import fingerprint, load_tokenizer, train_tokenizer

    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer, cfg.trust_remote_code)
    sources = src.resolve(cfg.data)
    for source in sources:
        if source.kind == "tokenized":
            beside = Path(source.name).parent
            if (beside / "tokenizer.json").is_file():
                return load_tokenizer(str(beside))
            raise UsageError(f"{source.name} is pre-tokenized: pass the tokenizer it was made with (--tokenizer)")
    kind = cfg.tokenizer_type or ("bpe" if cfg.objective == "clm" else "wordpiece")
    key = pipeline.cache_key(kind="tokenizer", data=[s.fingerprint() for s in sources], type=kind,
                             vocab=cfg.vocab_size, text_column=cfg.text_column, sample_by=cfg.sample_by)
    cached = pipeline.cache_root(cfg.cache_dir) / f"tok-{key}"
    if (cached / "tokenizer.json").is_file():
        return load_tokenizer(str(cached))
    display.info(f"training a {kind} tokenizer of {cfg.vocab_size} tokens on the training data "
                 "(pass --tokenizer to use your own)")
    tokenizer = train_tokenizer(src.iter_text_batches(sources, cfg.text_column, cfg.sample_by,
                                                      trust_remote_code=cfg.trust_remote_code),
                                kind, cfg.vocab_size)
    cached.parent.mkdir(parents=True, exist_ok=True)
    with pipeline.building(cached) as tmp:
        tokenizer.save_pretrained(tmp)
    display.detail(f"tokenizer {fingerprint(tokenizer)} cached in {cached}")
    return tokenizer


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Pretrain a fresh model of a preset size, or continue pretraining a saved one."""
    from llmkit import data as pipeline
    from llmkit import tasks
    from llmkit.card import versions
    from llmkit.tokenizer import load_tokenizer
    from llmkit.train import TrainJob, fit

    _setup(cfg)
    import torch

    torch.manual_seed(cfg.seed)
    continuing = cfg.model not in tasks.PRESETS
    shape = [f"--{name}" for name in ("architecture", "layers", "hidden", "heads") if getattr(cfg, name) is not None]
    if continuing and shape:
        raise UsageError(f"{', '.join(shape)} shape a fresh model, but --model {cfg.model} is not a size preset "
                         f"({', '.join(tasks.PRESETS)}): drop them to continue pretraining that model")
    with _main_first():
        if continuing:
            model = tasks.pretrained_model(cfg.objective, cfg.model, cfg.trust_remote_code)
            tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code)
            block_size = cfg.block_size or min(512, tasks.max_positions(model) or 512)
        else:
            tokenizer = _tokenizer_for_pretraining(cfg)
            block_size = cfg.block_size or tasks.PRESETS[cfg.model]["block_size"]
            model = tasks.fresh_model(cfg.objective, cfg.model, tokenizer, layers=cfg.layers, hidden=cfg.hidden,
                                      heads=cfg.heads, block_size=block_size, dropout=cfg.dropout,
                                      architecture=cfg.architecture)
        tasks.check_fit(model, tokenizer, block_size)
        corpus = pipeline.tokenize_corpus(cfg.data, tokenizer, eval_data=cfg.eval_data,
                                          validation_split=cfg.validation_split, text_column=cfg.text_column,
                                          sample_by=cfg.sample_by, max_samples=cfg.max_samples,
                                          cache_dir=cfg.cache_dir, trust_remote_code=cfg.trust_remote_code)
    train_blocks = pipeline.PackedBlocks(corpus.stream("train"), block_size)
    eval_stream = corpus.validation_stream()
    eval_blocks = pipeline.PackedBlocks(eval_stream, block_size) if eval_stream is not None else None
    if eval_blocks is not None and len(eval_blocks) == 0:
        display.info(f"[yellow]the held-out text ({eval_stream.n_tokens} tokens) is shorter than one block of "
                     f"{block_size}: no evaluation; pass --eval-data or a larger --validation-split[/yellow]")
        eval_blocks = None
    if len(train_blocks) == 0:
        raise LlmkitError(f"the training text has {corpus.info['tokens']} tokens, fewer than one block of "
                          f"{block_size}: give more data or a smaller --block-size")
    masking = tasks.make_masking(tokenizer, cfg.mlm_probability, cfg.whole_word_masking) \
        if cfg.objective == "mlm" else None
    if cfg.objective == "mlm" and tokenizer.mask_token_id is None:
        raise LlmkitError("the tokenizer has no mask token, which mlm needs: use a BERT-style tokenizer")
    job = TrainJob(cfg=cfg, objective=cfg.objective, model=model, tokenizer=tokenizer, train_data=train_blocks,
                   eval_data=eval_blocks, default_learning_rate=default_pretrain_lr(_hidden_size(model), continuing),
                   default_global_batch=32, masking=masking, tokens_per_example=block_size,
                   record={"objective": cfg.objective, "config": to_dict(cfg), "block_size": block_size,
                           "versions": versions(), "data_summary": {k: corpus.info.get(k) for k in
                                                                    ("documents", "tokens", "validation_tokens")}})
    return fit(job)


# ---------------------------------------------------------------------------------------------------------------
# finetune


def default_finetune_lr(hidden: int) -> float:
    """Small encoders want larger steps than BERT-base's 2e-5: all-MiniLM-L6-v2 (hidden 384) on SST-2 gains
    3-6 points from 1e-4 to 2e-4 over 2e-5 (../shared/anchors/README.md)."""
    return 1e-4 if hidden <= 384 else 5e-5 if hidden <= 768 else 2e-5


def _classifier_inputs(cfg, tokenizer, model_positions: int | None) -> int:
    from llmkit.tasks import check_length

    check_length(cfg.max_length, model_positions, "--max-length")  # refused, as --block-size is
    return cfg.max_length or min(512, model_positions or 512, tokenizer.model_max_length or 512)


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune a pretrained model for sequence classification."""
    import numpy as np
    import torch

    from llmkit import data as pipeline
    from llmkit import tasks
    from llmkit.card import versions
    from llmkit.tokenizer import load_tokenizer
    from llmkit.train import TrainJob, fit

    _setup(cfg)
    threshold = _parse_threshold(cfg.threshold, cfg.multi_label)  # a bad --threshold fails before any work
    torch.manual_seed(cfg.seed)
    positions = tasks.config_positions(cfg.model, cfg.trust_remote_code)  # first: a bad --model is named as such
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code)
    if tokenizer.pad_token is None:  # GPT-style vocabularies: pad with the eos token (masked out anyway)
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
    max_length = _classifier_inputs(cfg, tokenizer, positions)
    common = dict(text_column=cfg.text_column, text_pair_column=cfg.text_pair_column, label_column=cfg.label_column,
                  max_length=max_length, multi_label=cfg.multi_label, label_separator=cfg.label_separator,
                  cache_dir=cfg.cache_dir, trust_remote_code=cfg.trust_remote_code)
    with _main_first():
        train_set, labels = pipeline.prepare_classification(cfg.data, tokenizer, None, max_samples=cfg.max_samples,
                                                            **common)
        if cfg.eval_data:
            eval_set, _ = pipeline.prepare_classification(cfg.eval_data, tokenizer, labels, flag="--eval-data",
                                                          **common)
        elif cfg.validation_split > 0:
            split = train_set.train_test_split(test_size=cfg.validation_split, seed=pipeline.VALIDATION_SEED)
            train_set, eval_set = split["train"], split["test"]
        else:
            eval_set = None
    if cfg.multi_label:
        threshold = _thresholds_per_label(threshold, labels.names, bool(eval_set))
    problem = "multi_label_classification" if cfg.multi_label else "single_label_classification"
    model = tasks.pretrained_model("classification", cfg.model, cfg.trust_remote_code, num_labels=len(labels.names),
                                   id2label=labels.id2label, label2id=labels.label2id, problem_type=problem,
                                   ignore_mismatched_sizes=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    tasks.check_fit(model, tokenizer)
    if cfg.multi_label:  # saved in config.json for evaluate and classify; `auto`: each evaluation saves its own
        model.config.llmkit_thresholds = dict(zip(labels.names, [0.5] * len(labels.names)
                                                  if threshold == "auto" else threshold))
    weights = None
    if cfg.class_weights:
        weights = _class_weights(cfg.class_weights, np.asarray(train_set["labels"]), len(labels.names))
    truncated = int(np.sum(train_set["truncated"]))
    if truncated:
        display.info(f"{truncated} of {len(train_set)} training texts were truncated to {max_length} tokens "
                     "(--max-length)")
    job = TrainJob(cfg=cfg, objective="classification", model=model, tokenizer=tokenizer,
                   train_data=pipeline.LabeledExamples(train_set, tokenizer.pad_token_id),
                   eval_data=pipeline.LabeledExamples(eval_set, tokenizer.pad_token_id) if eval_set else None,
                   default_learning_rate=default_finetune_lr(_hidden_size(model)), default_global_batch=32,
                   metric=cfg.metric, class_weights=weights, multi_label=cfg.multi_label, threshold=threshold,
                   label_names=labels.names,
                   record={"objective": "classification", "config": to_dict(cfg), "labels": labels.names,
                           "max_length": max_length, "versions": versions()})
    if not cfg.group_by_length:
        job.train_data.lengths = lambda: None
    return fit(job)


def _parse_threshold(spec: str | None, multi_label: bool) -> list[float] | str:
    """--threshold as given: "auto", or one or more numbers (how many the labels need is checked once they are
    known)."""
    if spec is None:
        return [0.5]
    if not multi_label:
        raise UsageError("--threshold applies to --multi-label classification (a single-label classifier picks "
                         "the likeliest class): add --multi-label or drop --threshold")
    if spec.strip() == "auto":
        return "auto"
    try:
        values = [float(x) for x in spec.split(",")]
    except ValueError:
        raise UsageError(f"--threshold {spec!r}: give `auto`, a number, or one number per label separated by "
                         "commas") from None
    if not all(0 < v < 1 for v in values):
        raise UsageError(f"--threshold {spec!r}: thresholds must lie between 0 and 1 (exclusive)")
    return values


def _thresholds_per_label(threshold: list[float] | str, names: list[str], can_tune: bool) -> list[float] | str:
    """One threshold per label, or "auto" when there is evaluation data to tune them on."""
    if threshold == "auto":
        if can_tune:
            return "auto"
        display.info("[yellow]--threshold auto tunes on evaluation data and there is none (no --eval-data, "
                     "--validation-split 0): the thresholds stay 0.5[/yellow]")
        return [0.5] * len(names)
    if len(threshold) == 1:
        return threshold * len(names)
    if len(threshold) != len(names):
        raise UsageError(f"--threshold gives {len(threshold)} numbers for {len(names)} labels: give one, or one per "
                         f"label in this order: {', '.join(names)}")
    return threshold


def _class_weights(spec: str, labels, n_classes: int):
    import numpy as np
    import torch

    if labels.ndim == 2:
        raise UsageError("--class-weights applies to single-label classification, not --multi-label")
    if spec == "auto":
        counts = np.bincount(labels, minlength=n_classes).astype(float)
        weights = counts.sum() / (n_classes * np.maximum(counts, 1))
    else:
        try:
            weights = np.asarray([float(x) for x in spec.split(",")])
        except ValueError:
            raise UsageError(f"--class-weights {spec!r}: give `auto` or numbers separated by commas") from None
        if len(weights) != n_classes or (weights <= 0).any():
            raise UsageError(f"--class-weights needs {n_classes} positive numbers (one per class), got {spec!r}")
    return torch.tensor(weights, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# evaluate


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Score a model: perplexity for language models, accuracy / F1 / per-class figures for classifiers."""
    from llmkit import data as pipeline
    from llmkit import sources as src
    from llmkit import tasks
    from llmkit.evaluation import OFFLINE_METRICS, evaluate_model, hub_metric, saved_thresholds
    from llmkit.tokenizer import load_tokenizer
    from llmkit.train import make_accelerator

    _setup(cfg)
    for flag, path in (("--output", cfg.output), ("--predictions", cfg.predictions)):
        _check_output_file(path, flag, cfg.data + cfg.eval_data)
    tasks.check_model_dir(cfg.model)
    objective = tasks.objective_of(cfg.model, cfg.trust_remote_code)
    if not cfg.data and not cfg.eval_data:
        raise UsageError("give the data to score: --eval-data FILE (or --data FILE with --split)")
    data_flag = "--eval-data" if cfg.eval_data else "--data"
    src.resolve(cfg.eval_data or cfg.data, data_flag)  # a missing file fails now, under its own flag
    tokenizer = load_tokenizer(cfg.tokenizer if hasattr(cfg, "tokenizer") and cfg.tokenizer else cfg.model,
                               cfg.trust_remote_code)
    accelerator, precision = make_accelerator(cfg.precision)
    model = tasks.pretrained_model(objective, cfg.model, cfg.trust_remote_code).to(accelerator.device)
    use_held_out = cfg.split == "validation" and not cfg.eval_data
    data = cfg.eval_data or cfg.data
    if objective in ("clm", "mlm"):
        record = tasks.run_record(cfg.model)
        block_size = cfg.block_size or record.get("block_size") or min(512, tasks.max_positions(model) or 512)
        tasks.check_fit(accelerator.unwrap_model(model), tokenizer, block_size)
        with _main_first():
            corpus = pipeline.tokenize_corpus(data, tokenizer, validation_split=cfg.validation_split
                                              if use_held_out else 0.0, text_column=cfg.text_column,
                                              sample_by=cfg.sample_by, max_samples=cfg.max_samples,
                                              cache_dir=cfg.cache_dir, trust_remote_code=cfg.trust_remote_code,
                                              flag=data_flag)
        stream = corpus.validation_stream() if use_held_out else corpus.stream("train")
        if stream is None:
            raise LlmkitError("no held-out text to score: pass --eval-data, or --split train")
        blocks = pipeline.PackedBlocks(stream, block_size)
        if len(blocks) == 0:
            raise LlmkitError(f"the text has {stream.n_tokens} tokens, fewer than one block of {block_size}: give "
                              "more text or a smaller --block-size")
        masking = tasks.make_masking(tokenizer, cfg.mlm_probability, False) if objective == "mlm" else None
        metrics = evaluate_model(objective, model, blocks, accelerator, batch_size=cfg.batch_size, seed=cfg.seed,
                                 masking=masking)
        metrics.update(blocks=len(blocks), block_size=block_size)
    else:
        config = accelerator.unwrap_model(model).config
        names = [config.id2label[i] for i in range(config.num_labels)]
        multi = config.problem_type == "multi_label_classification"
        labels = pipeline.LabelSpace(names, multi)
        max_length = _classifier_inputs(cfg, tokenizer, tasks.max_positions(accelerator.unwrap_model(model)))
        with _main_first():
            dataset, _ = pipeline.prepare_classification(
                data, tokenizer, labels, text_column=cfg.text_column, text_pair_column=cfg.text_pair_column,
                label_column=cfg.label_column, max_length=max_length, multi_label=multi,
                max_samples=cfg.max_samples, cache_dir=cfg.cache_dir, trust_remote_code=cfg.trust_remote_code,
                flag=data_flag, require_labels=False)
        if use_held_out and cfg.validation_split > 0:
            dataset = dataset.train_test_split(test_size=cfg.validation_split, seed=pipeline.VALIDATION_SEED)["test"]
        examples = pipeline.LabeledExamples(dataset, tokenizer.pad_token_id or 0)
        metrics = evaluate_model("classification", model, examples, accelerator, batch_size=cfg.batch_size,
                                 multi_label=multi, threshold=saved_thresholds(config, names), label_names=names,
                                 return_predictions=True)
        order, logits, predictions = metrics.pop("_predictions")
        for name in cfg.metric:
            if name not in OFFLINE_METRICS and examples.has_labels:
                metrics.update({f"{name}_{k}" if k in metrics else k: v for k, v in
                                hub_metric(name, predictions, examples.labels_at(order),
                                           cfg.trust_remote_code).items()})
        if cfg.predictions and accelerator.is_main_process:
            _write_predictions(Path(cfg.predictions), dataset, order, logits, predictions, names, multi, tokenizer)
    metrics["precision_used"] = precision
    if cfg.output and accelerator.is_main_process:
        with _writing(Path(cfg.output)) as f:
            f.write(json.dumps(metrics, indent=2))
    return metrics


def _check_output_file(path: str | None, flag: str, inputs: list[str]) -> None:
    """Refuse, before any work, an output file that cannot be written or that is one of the inputs."""
    if path is None:
        return
    target = Path(path).expanduser()
    if target.is_dir():
        raise UsageError(f"{flag} {path} is a directory: give a file name")
    blocking = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UsageError(f"{flag} {path}: {blocking} is a file, not a directory; choose another path")
    if target.is_file() and any(Path(i).is_file() and os.path.samefile(target, i) for i in inputs):
        raise UsageError(f"{flag} {path} is one of the input files and would be overwritten: choose another name")


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[TextIO]:
    """A file to write, through a temporary sibling renamed over `path` at the end: a failure (a full disk) leaves
    the old file or none, never half a new one. Links, devices and pipes (/dev/stdout) are written directly:
    a rename would replace them."""
    if path.is_symlink() or path.exists() and not path.is_file():
        with open(path, "w") as f:
            yield f
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            yield f
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_predictions(path: Path, dataset, order, logits, predictions, names, multi, tokenizer) -> None:
    import numpy as np

    from llmkit.evaluation import sigmoid, softmax

    probs = sigmoid(logits) if multi else softmax(logits)
    labels = dataset["labels"] if "labels" in dataset.column_names else None
    with _writing(path) as f:
        for row, index in enumerate(order):
            entry = {"index": int(index), "text": tokenizer.decode(dataset[int(index)]["input_ids"],
                                                                   skip_special_tokens=True)}
            if multi:
                entry["labels"] = [names[j] for j in np.flatnonzero(predictions[row])]
            else:
                entry["label"] = names[int(predictions[row])]
                entry["score"] = float(probs[row].max())
            if labels is not None:
                gold = labels[int(index)]
                entry["gold"] = [names[j] for j, v in enumerate(gold) if v] if multi else names[int(gold)]
            f.write(json.dumps(entry) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# classify


def classify(cfg: ClassifyConfig, stdin=None) -> list[dict[str, Any]]:
    """Labels and scores for texts given as arguments, in a file, or on stdin (`-`)."""
    from llmkit.predict import Classifier, read_texts

    _setup(cfg)
    texts = read_texts(cfg.texts, cfg.file, cfg.text_column, stdin or sys.stdin)
    classifier = Classifier(cfg.model, precision=cfg.precision, max_length=cfg.max_length)
    return classifier(texts, top_k=cfg.top_k, batch_size=cfg.batch_size)


# ---------------------------------------------------------------------------------------------------------------
# generate and fill


def generate(cfg: GenerateConfig) -> list[dict[str, Any]]:
    """Continue each prompt with a causal language model."""
    from llmkit.predict import generate_texts

    _setup(cfg)
    if not cfg.prompts:
        raise UsageError('nothing to continue: give a prompt (llmkit generate "Once upon a time" --model DIR)')
    return generate_texts(cfg.model, cfg.prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                          top_k=cfg.top_k, top_p=cfg.top_p, num_return_sequences=cfg.num_return_sequences,
                          seed=cfg.seed)


def fill(cfg: FillConfig) -> list[dict[str, Any]]:
    """The likeliest tokens for each mask of each text, by a masked language model."""
    from llmkit.predict import fill_masks

    _setup(cfg)
    if not cfg.texts:
        raise UsageError('nothing to fill: give a text with a mask (llmkit fill "The {mask} is bright." --model DIR)')
    return fill_masks(cfg.model, cfg.texts, top_k=cfg.top_k)


# ---------------------------------------------------------------------------------------------------------------
# env, recipes, plot

ACCELERATE_KEYS = ("compute_environment", "distributed_type", "num_machines", "num_processes", "mixed_precision",
                   "gpu_ids")


def env(cfg: EnvConfig) -> dict[str, Any]:
    """What llmkit runs with here: library versions, devices, bf16, the accelerate config, the cache directory."""
    import torch

    from llmkit.card import versions
    from llmkit.data import cache_root
    from llmkit.hub import offline
    from llmkit.train import cpu_bf16_speedup, cpu_has_fast_bf16, resolve_precision

    devices: list[dict[str, Any]] = []
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(index)
        devices.append({"device": f"cuda:{index}", "name": props.name,
                        "memory_gb": round(props.total_memory / 2**30, 1),
                        "bf16_fast": props.major >= 8})  # bf16 tensor cores: Ampere (compute capability 8.0) on
    devices.append({"device": "cpu", "name": _cpu_name(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "bf16_fast": cpu_has_fast_bf16(),
                    "bf16_matmul_speedup": round(cpu_bf16_speedup(), 2)})
    default = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {"versions": versions(), "devices": devices, "default_device": str(default),
            "precision_auto": resolve_precision("auto", default), "accelerate_config": _accelerate_config(),
            "cache_dir": str(cache_root()), "hub": "offline" if offline() else "online"}


def _cpu_name() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _accelerate_config() -> dict[str, Any]:
    """accelerate's default config file (written by `accelerate config`): runs of several processes on GPUs read
    it unless --accelerate-config names another file."""
    import yaml
    from accelerate.commands.config import default_config_file

    path = Path(default_config_file)
    found: dict[str, Any] = {"path": str(path), "exists": path.is_file()}
    if path.is_file():
        try:
            settings = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML, or the older JSON (also YAML)
        except (yaml.YAMLError, UnicodeDecodeError):
            settings = None
        if not isinstance(settings, dict):
            found["problem"] = "not a readable config: rewrite it with `accelerate config`"
        else:
            found.update({key: settings[key] for key in ACCELERATE_KEYS if key in settings})
    return found


def recipes(cfg: RecipesConfig) -> list[dict[str, str]]:
    """The shipped recipes: path (relative to the current directory when inside it), command, description."""
    from llmkit.recipes import command_of, describe, recipe_files, recipes_dir

    root = recipes_dir()
    found = recipe_files(root) if root.is_dir() else []
    if not found:
        raise LlmkitError(f"no recipes in {root}: the recipes ship with llmkit's source checkout; run llmkit from "
                          "there (or from a directory holding recipes/)")
    cwd = Path.cwd()
    return [{"path": str(p.relative_to(cwd) if p.is_relative_to(cwd) else p), "command": command_of(p),
             "description": describe(p)} for p in found]


def plot(cfg: PlotConfig) -> Path:
    """Training and validation curves of one run or several, in one image."""
    from llmkit.plot import save_curves

    return save_curves([Path(d) for d in cfg.run_dirs], Path(cfg.output))
