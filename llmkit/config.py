"""Typed settings for every command, recipe loading and validation.

Each command's settings are one dataclass. A field's metadata carries its help text (which becomes the
`--help` text of the flag of the same name) and its constraints. Recipes are YAML files whose keys are the
long flag names with `_` for `-`, so that a recipe and a command line read the same. Values are merged as
defaults < recipe < flags, and every problem is reported at once, each naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from llmkit.errors import UsageError


def opt(default: Any, help: str, *, choices: tuple[str, ...] | None = None, check: str | None = None,
        argument: bool = False, short: str | None = None, required: bool = False) -> Any:
    """A settings field. `check` is one of "positive", "nonneg", "fraction" (0 < x < 1), "prob" (0 <= x <= 1)."""
    meta = {"help": help, "choices": choices, "check": check, "argument": argument, "short": short,
            "required": required}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------------------------------
# Settings shared by the commands. Subclasses add fields; a field keeps its meaning wherever it appears.


@dataclass
class Common:
    quiet: bool = opt(False, "Print only errors and the final result.", short="-q")
    verbose: bool = opt(False, "Print more detail (library warnings, per-step logs).", short="-v")


DATA_HELP = ("Training data: .txt/.csv/.tsv/.json/.jsonl/.parquet files, a directory or glob of them, a "
             "datasets.save_to_disk directory, an `llmkit tokenize` output, or a Hub dataset id "
             "name[:config][@split] (split: train by default). Repeat the flag for several sources.")


@dataclass
class DataSettings(Common):
    data: list[str] = opt([], DATA_HELP)
    eval_data: list[str] = opt([], "Held-out data, in the same forms as --data. Without it, --validation-split "
                                   "carves a held-out part out of --data.")
    validation_split: float = opt(0.05, "Fraction of --data held out for evaluation when --eval-data is not "
                                         "given (0 to hold out nothing).", check="prob")
    text_column: Optional[str] = opt(None, "Column holding the text (default: auto-detect text/sentence/content).")
    sample_by: str = opt("paragraph", "How a .txt file splits into documents: one per line, per blank-line "
                                      "separated paragraph, or the whole file.",
                         choices=("line", "paragraph", "document"))
    max_samples: Optional[int] = opt(None, "Use only the first N documents/examples of --data (for quick tries).",
                                     check="positive")
    cache_dir: Optional[str] = opt(None, "Where tokenized data is cached (default: $LLMKIT_CACHE or "
                                         "~/.cache/llmkit).")
    trust_remote_code: bool = opt(False, "Allow a Hub model or dataset to run its own Python code.")


@dataclass
class LaunchSettings:
    """How many processes and machines run the command (through accelerate's launcher)."""

    num_processes: Optional[int] = opt(None, "Processes in all, over all machines (re-launches through "
                                             "accelerate).", check="positive")
    num_machines: int = opt(1, "Machines taking part.", check="positive")
    machine_rank: int = opt(0, "This machine's rank, 0 to num_machines-1.", check="nonneg")
    main_process_ip: Optional[str] = opt(None, "Address of the rank-0 machine.")
    main_process_port: Optional[int] = opt(None, "Port of the rank-0 machine.", check="positive")
    accelerate_config: Optional[str] = opt(None, "An accelerate config file (DDP, FSDP, DeepSpeed).")


@dataclass
class TrainSettings(LaunchSettings, DataSettings):
    data: list[str] = opt([], DATA_HELP, required=True)  # evaluate may score --eval-data alone; training may not
    output: Optional[str] = opt(None, "Run directory: final model at its top, checkpoints/, best/, "
                                      "metrics.jsonl.", short="-o", required=True)
    tokenizer: Optional[str] = opt(None, "Tokenizer: an `llmkit tokenize` output, a directory or a Hub id "
                                         "(default: the model's own, or one trained on the fly).")
    seed: int = opt(42, "Random seed for initialisation, data order, masking and dropout.")
    max_steps: Optional[int] = opt(None, "Stop after this many optimizer steps.", check="positive")
    epochs: Optional[float] = opt(None, "Stop after this many passes over the training data.", check="positive")
    learning_rate: Optional[float] = opt(None, "Peak learning rate (default: per task and model size).",
                                         check="positive")
    warmup_steps: Optional[float] = opt(None, "Linear warm-up: a number of steps, or a fraction of all steps "
                                              "when below 1 (default: 6% of the steps, at most 1000).",
                                        check="nonneg")
    lr_schedule: str = opt("cosine", "Learning-rate decay after warm-up.", choices=("cosine", "linear", "constant"))
    min_lr_ratio: float = opt(0.1, "Final learning rate as a fraction of the peak (cosine and linear).",
                              check="prob")
    weight_decay: float = opt(0.1, "AdamW weight decay, applied to weight matrices and embeddings (not to "
                                   "biases or norm gains).", check="nonneg")
    adam_beta1: float = opt(0.9, "AdamW beta1.", check="fraction")
    adam_beta2: float = opt(0.95, "AdamW beta2.", check="fraction")
    max_grad_norm: float = opt(1.0, "Clip the gradient norm to this value (0 turns clipping off).", check="nonneg")
    global_batch_size: Optional[int] = opt(None, "Examples per optimizer step, over all processes; "
                                                 "accumulation makes up the difference.", check="positive")
    micro_batch_size: Optional[int] = opt(None, "Examples per forward pass on one process (default: all of the "
                                                "process's share of the global batch, no accumulation).",
                                          check="positive")
    precision: str = opt("auto", "Numeric precision. auto = bf16 where the hardware runs it fast (recent GPUs, "
                                 "CPUs whose bf16 matrix products measure faster than fp32's, as with AMX), "
                                 "else fp32.",
                         choices=("auto", "fp32", "bf16", "fp16"))
    compile: bool = opt(False, "Compile the model with torch.compile (slower start; here the eager path is faster).")
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass to save memory.")
    eval_every: Optional[int] = opt(None, "Evaluate every N steps (default: about 10 times per run, fewer where "
                                          "evaluating would take over a fifth of the training's compute).",
                                    check="positive")
    eval_batches: Optional[int] = opt(None, "Evaluate during training on N batches per process, the same sample "
                                      "spread over the whole set each time; the last evaluation uses all "
                                      "(default: all).", check="positive")
    save_every: Optional[int] = opt(None, "Write a checkpoint every N steps (default: at each --eval-every, else "
                                          "about 10 times per run).",
                                    check="positive")
    keep_checkpoints: int = opt(2, "How many recent checkpoints to keep.", check="positive")
    log_every: int = opt(10, "Log loss, learning rate and throughput every N steps.", check="positive")
    resume: Optional[str] = opt(None, "Continue an interrupted run: `auto` (newest complete checkpoint in "
                                      "--output) or a checkpoint directory.")
    overwrite: bool = opt(False, "Start afresh in an --output that already holds a finished run.")
    report_to: list[str] = opt([], "Also log to TensorBoard (event files in OUTPUT/tensorboard) or Weights & "
                                   "Biases; needs the tracker's package (pip install 'llmkit[tensorboard]').",
                               choices=("tensorboard", "wandb"))
    dry_run: bool = opt(False, "Print the plan (parameters, tokens, steps, FLOPs, memory, time) and stop.")
    json: bool = opt(False, "Print the final metrics (or the --dry-run plan) as one JSON object on stdout.")


@dataclass
class TokenizeConfig(DataSettings):
    data: list[str] = opt([], DATA_HELP, required=True)
    output: Optional[str] = opt(None, "Directory for the tokenizer and the pre-tokenized data.", short="-o",
                                required=True)
    tokenizer: Optional[str] = opt(None, "Use this existing tokenizer (directory or Hub id) instead of training "
                                         "one.")
    tokenizer_type: str = opt("bpe", "Tokenizer to train: byte-level BPE (GPT-style), WordPiece (BERT-style) "
                                     "or Unigram.", choices=("bpe", "wordpiece", "unigram"))
    vocab_size: int = opt(8192, "Vocabulary size to train to.", check="positive")
    min_frequency: int = opt(2, "Ignore pairs/words seen fewer times than this while training.",
                             check="positive")
    lowercase: bool = opt(False, "Lower-case text before tokenizing (WordPiece only, like bert-base-uncased).")
    block_size: int = opt(512, "Block size for the summary's count of packed blocks (the tokens are stored "
                               "unpacked: pretrain may use any block size).", check="positive")
    model_max_length: int = opt(1024, "Longest sequence the tokenizer reports (model_max_length).",
                                check="positive")
    json: bool = opt(False, "Print the summary as one JSON object.")


@dataclass
class PretrainConfig(TrainSettings):
    objective: str = opt("clm", "clm: next-token prediction (GPT-style); mlm: masked-token prediction "
                                "(BERT-style).", choices=("clm", "mlm"))
    model: str = opt("tiny", "A size preset for a fresh model - tiny (2 layers x 64), mini (4 x 256), small "
                             "(6 x 384), base, gpt2-small, bert-base (12 x 768), gpt2-medium (24 x 1024) - or a "
                             "model directory / Hub id to continue pretraining.", short="-m")
    architecture: Optional[str] = opt(None, "Architecture of a fresh model: gpt2 or llama for clm, bert or "
                                            "roberta for mlm (default: gpt2 / bert).",
                                      choices=("gpt2", "llama", "bert", "roberta"))
    layers: Optional[int] = opt(None, "Override the preset's number of layers.", check="positive")
    hidden: Optional[int] = opt(None, "Override the preset's hidden size.", check="positive")
    heads: Optional[int] = opt(None, "Override the preset's attention heads.", check="positive")
    block_size: Optional[int] = opt(None, "Tokens per training sequence (default: the preset's, or 512 "
                                          "capped to the model's positions).", check="positive")
    tokens_per_step: Optional[int] = opt(None, "Tokens per optimizer step (sets the global batch to "
                                               "tokens_per_step / block_size).", check="positive")
    # A pretraining budget only: a classifier's examples differ in length, so finetune counts steps or epochs.
    max_tokens: Optional[int] = opt(None, "Stop after this many training tokens.", check="positive")
    vocab_size: int = opt(8192, "Vocabulary size of a tokenizer trained on the fly.", check="positive")
    tokenizer_type: Optional[str] = opt(None, "Tokenizer trained on the fly (default: bpe for clm, wordpiece "
                                              "for mlm).", choices=("bpe", "wordpiece", "unigram"))
    mlm_probability: float = opt(0.15, "Share of tokens selected for prediction (mlm).", check="fraction")
    whole_word_masking: bool = opt(False, "Mask whole words rather than single tokens (mlm).")
    dropout: float = opt(0.0, "Dropout of a fresh model (0 suits pretraining on plenty of data).", check="prob")


@dataclass
class FinetuneConfig(TrainSettings):
    model: Optional[str] = opt(None, "Pretrained model: a directory (llmkit's pretrain output or any Hugging "
                                     "Face model) or a Hub id.", short="-m", required=True)
    label_column: Optional[str] = opt(None, "Column holding the label (default: auto-detect label/labels/"
                                            "category).")
    text_pair_column: Optional[str] = opt(None, "Second text column, for sentence-pair tasks.")
    multi_label: bool = opt(False, "Each example may carry several labels (sigmoid per label).")
    label_separator: str = opt(",", "Separator between labels in a string label (multi-label).")
    threshold: Optional[str] = opt(None, "Decision threshold of each label with --multi-label (default: 0.5), "
                                         "saved with the model for evaluate and classify: one number for all labels, "
                                         "one per label separated by commas (in the order of config.json's "
                                         "id2label), or `auto`: the threshold that maximises the label's F1 on the "
                                         "evaluation data, tuned at each evaluation (0.5 without evaluation data).")
    max_length: Optional[int] = opt(None, "Truncate texts to this many tokens (default: the model's limit, "
                                          "at most 512).", check="positive")
    class_weights: Optional[str] = opt(None, "Weigh classes in the loss: `auto` (inverse frequency) or a "
                                             "comma-separated list of numbers.")
    metric: str = opt("accuracy", "Metric that picks the best model and drives early stopping (loss: lower is "
                                  "better; the others: higher). f1, precision and recall are as the `evaluate` "
                                  "library's: of label id 1 for two classes, macro averages for more classes and "
                                  "for --multi-label.",
                      choices=("accuracy", "f1", "precision", "recall", "f1_macro", "f1_micro", "f1_weighted",
                               "matthews_correlation", "loss"))
    patience: Optional[int] = opt(None, "Stop after this many evaluations without improvement.",
                                  check="positive")
    group_by_length: bool = opt(True, "Batch examples of similar length together (less padding).")


@dataclass
class EvaluateConfig(LaunchSettings, DataSettings):
    model: Optional[str] = opt(None, "Model directory or Hub id to evaluate.", short="-m", required=True)
    split: str = opt("validation", "What to score: `validation` (--eval-data, or the held-out part of --data) "
                                   "or `train` (all of --data).", choices=("validation", "train"))
    label_column: Optional[str] = opt(None, "Column holding the label (classifiers).")
    text_pair_column: Optional[str] = opt(None, "Second text column, for sentence-pair tasks.")
    metric: list[str] = opt([], "Extra metrics by name: any that `evaluate` knows (loaded from the Hub when "
                                "online). Built in, offline and always reported for classifiers: accuracy, f1, "
                                "precision, recall (as `evaluate` defines them: of label id 1 for two classes; "
                                "for more classes and multi-label, where `evaluate` needs an average, macro), "
                                "f1_macro, f1_micro, f1_weighted, matthews_correlation.")
    block_size: Optional[int] = opt(None, "Tokens per sequence for language models (default: the model's "
                                          "training block size).", check="positive")
    batch_size: int = opt(32, "Examples per forward pass.", check="positive")
    mlm_probability: float = opt(0.15, "Share of tokens masked when scoring a masked LM.", check="fraction")
    precision: str = opt("auto", "Numeric precision.", choices=("auto", "fp32", "bf16", "fp16"))
    seed: int = opt(42, "Masking seed for masked LMs: the same seed gives the same number.")
    max_length: Optional[int] = opt(None, "Truncate classifier inputs to this many tokens.", check="positive")
    json: bool = opt(False, "Print the metrics as one JSON object on stdout.")
    output: Optional[str] = opt(None, "Also write the metrics as JSON to this file.", short="-o")
    predictions: Optional[str] = opt(None, "Write per-example predictions to this .jsonl file.")


@dataclass
class ClassifyConfig(Common):
    texts: list[str] = opt([], "Texts to classify; `-` reads one text per line from stdin.", argument=True)
    model: Optional[str] = opt(None, "A fine-tuned classifier directory or Hub id.", short="-m", required=True)
    file: Optional[str] = opt(None, "Read texts from a file: .txt (one per line), .csv/.tsv/.jsonl (the text "
                                    "column).")
    text_column: Optional[str] = opt(None, "Column of --file that holds the text.")
    top_k: int = opt(1, "How many labels to show per text.", check="positive")
    batch_size: int = opt(64, "Texts per forward pass.", check="positive")
    max_length: Optional[int] = opt(None, "Truncate texts to this many tokens (default: the model's limit).",
                                    check="positive")
    precision: str = opt("auto", "Numeric precision.", choices=("auto", "fp32", "bf16", "fp16"))
    json: bool = opt(False, "Print one JSON object per text.")


# ---------------------------------------------------------------------------------------------------------------
# Loading, merging and validating.


def fields_of(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def field_type(cls: type, name: str) -> Any:
    return _type_hints(cls)[name]


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a settings class, once per class: resolving them all for each field of every
    command was most of the CLI's start-up (~0.25 s of `llmkit --help` or `llmkit classify TEXT`)."""
    return typing.get_type_hints(cls)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_list) with Optional stripped."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin is list:
        return typing.get_args(tp)[0], True
    return tp, False


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Coerce a recipe value to the field's type, or raise ValueError with a message naming the key."""
    if value is None:
        return None
    inner, is_list = _base_type(tp)
    if is_list:
        items = value if isinstance(value, list) else [value]
        return [_coerce(key, v, inner) for v in items]
    if inner is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"`{key}` must be true or false, not {value!r}")
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"`{key}` must be a whole number, not {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"`{key}` must be a whole number, not {value!r}") from None
        if number != int(number):
            raise ValueError(f"`{key}` must be a whole number, not {value!r}")
        return int(number)
    if inner is float:
        if isinstance(value, bool):
            raise ValueError(f"`{key}` must be a number, not {value!r}")
        try:
            return float(value)  # PyYAML reads 3e-4 as a string: accept it as the number it means
        except (TypeError, ValueError):
            raise ValueError(f"`{key}` must be a number, not {value!r}") from None
    if inner is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"`{key}` must be a single value, not {value!r}")
        return str(value)
    return value


def did_you_mean(word: str, candidates: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def load_recipe(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"recipe {path} does not exist: give the path of a YAML file (`llmkit recipes` lists "
                         "the shipped ones)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"recipe {path} is not UTF-8 text: save it as UTF-8 YAML") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"recipe {path} is not valid YAML{where}: {problem}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"recipe {path} must be a mapping of `key: value` lines, not a {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_config(cls: type, recipe: dict[str, Any] | None = None, flags: dict[str, Any] | None = None,
                 recipe_name: str = "recipe") -> Any:
    """Merge defaults < recipe < flags into a `cls` instance; report every problem at once."""
    known = fields_of(cls)
    problems: list[str] = []
    values: dict[str, Any] = {}
    for key, value in (recipe or {}).items():
        if key not in known:
            problems.append(f"unknown key `{key}` in {recipe_name}{did_you_mean(key, known)}")
            continue
        try:
            values[key] = _coerce(key, value, field_type(cls, key))
        except ValueError as e:
            problems.append(f"{e} in {recipe_name}")
    for key, value in (flags or {}).items():
        if key not in known:
            problems.append(f"unknown setting `{key}`{did_you_mean(key, known)}")
            continue
        if value is None or value == []:
            continue
        try:
            values[key] = _coerce(key, value, field_type(cls, key))
        except ValueError as e:
            problems.append(str(e))
    config = cls(**values)
    problems += validate(config)
    if problems:
        raise UsageError("; ".join(problems))
    return config


def validate(config: Any) -> list[str]:
    problems = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        meta = f.metadata
        flag = "--" + f.name.replace("_", "-")
        if meta.get("required") and value in (None, [], ""):
            problems.append(f"{flag} is required")
            continue
        if value is None:
            continue
        choices = meta.get("choices")
        for item in value if isinstance(value, list) else [value]:
            if choices and item not in choices:
                problems.append(f"{flag} must be one of {', '.join(choices)}, not {item!r}"
                                f"{did_you_mean(str(item), choices)}")
        check = meta.get("check")
        if check == "positive" and not value > 0:
            problems.append(f"{flag} must be greater than 0, not {value}")
        elif check == "nonneg" and not value >= 0:
            problems.append(f"{flag} must be 0 or more, not {value}")
        elif check == "fraction" and not 0 < value < 1:
            problems.append(f"{flag} must be between 0 and 1 (exclusive), not {value}")
        elif check == "prob" and not 0 <= value <= 1:
            problems.append(f"{flag} must be between 0 and 1, not {value}")
    return problems


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def to_yaml(config: Any) -> str:
    import yaml

    return yaml.safe_dump(to_dict(config), sort_keys=False)


def to_json(config: Any) -> str:
    return json.dumps(to_dict(config), indent=2)


# ---------------------------------------------------------------------------------------------------------------
# Settings of the commands that use a trained model or look around: generate, fill, env, recipes, plot.


@dataclass
class GenerateConfig(Common):
    prompts: list[str] = opt([], "Prompts to continue; each gets its own texts.", argument=True)
    model: Optional[str] = opt(None, "A causal language model: a directory (`llmkit pretrain --objective clm` "
                                     "output or any GPT-style model) or a Hub id.", short="-m", required=True)
    max_new_tokens: int = opt(50, "Tokens to generate after the prompt (fewer if the model ends the text).",
                              check="positive")
    temperature: float = opt(1.0, "Sampling temperature: below 1 sticks to likely tokens, above 1 varies more; "
                                  "0 takes the most likely token every time (greedy, no sampling).",
                             check="nonneg")
    top_k: int = opt(50, "Sample among the k most likely tokens only (0: no limit).", check="nonneg")
    top_p: float = opt(1.0, "Sample among the most likely tokens whose probabilities add up to p (nucleus "
                            "sampling; 1: no limit).", check="prob")
    seed: Optional[int] = opt(None, "Sampling seed: the same seed, prompt and settings give the same text "
                                    "(default: a fresh seed each run, shown by --json).")
    num_return_sequences: int = opt(1, "Texts to generate per prompt (needs --temperature above 0).",
                                    check="positive")
    json: bool = opt(False, "Print one JSON object per prompt.")


@dataclass
class FillConfig(Common):
    texts: list[str] = opt([], "Texts with one or more masks: `{mask}`, or the model's own mask token such as "
                               "[MASK].", argument=True)
    model: Optional[str] = opt(None, "A masked language model: a directory (`llmkit pretrain --objective mlm` "
                                     "output or any BERT-style model) or a Hub id.", short="-m", required=True)
    top_k: int = opt(5, "Predictions to show per mask.", check="positive")
    json: bool = opt(False, "Print one JSON object per text.")


@dataclass
class EnvConfig:
    json: bool = opt(False, "Print everything as one JSON object.")


@dataclass
class RecipesConfig:
    json: bool = opt(False, "Print the recipes as one JSON list.")


@dataclass
class PlotConfig:
    run_dirs: list[str] = opt([], "Run directories (the --output of pretrain or finetune) to draw in one figure.",
                              argument=True)
    output: Optional[str] = opt(None, "Image to write: .png, .svg or .pdf.", short="-o", required=True)
