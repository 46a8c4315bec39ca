"""Model cards (README.md in every saved model directory) and the versions recorded with every run."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

LIBRARIES = ("llmkit", "torch", "transformers", "accelerate", "datasets", "tokenizers", "evaluate", "safetensors")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _loader(objective: str) -> str:
    return {"clm": "AutoModelForCausalLM", "mlm": "AutoModelForMaskedLM"}.get(objective,
                                                                           "AutoModelForSequenceClassification")


def model_card(model, record: dict[str, Any]) -> str:
    objective = record.get("objective", "classification")
    config = record.get("config", {})
    metrics = record.get("metrics", {})
    params = sum(p.numel() for p in model.parameters())
    loader = _loader(objective)
    what = {"clm": "a causal (GPT-style) language model", "mlm": "a masked (BERT-style) language model"}.get(
        objective, "a text classifier")
    lines = [
        f"# {type(model).__name__} trained with llmkit", "",
        f"This is {what} with {params / 1e6:.2f}M parameters, trained by `llmkit "
        f"{'pretrain' if objective in ('clm', 'mlm') else 'finetune'}`.", "",
        "## Data", "",
        f"- training data: {', '.join(config.get('data', [])) or 'n/a'}",
        f"- evaluation data: {', '.join(config.get('eval_data', [])) or 'held-out part of the training data'}",
    ]
    if record.get("labels"):
        lines.append(f"- labels: {', '.join(record['labels'])}")
    lines += ["", "## Configuration", "", "| setting | value |", "| --- | --- |"]
    for key in ("model", "objective", "block_size", "max_length", "learning_rate", "global_batch_size",
                "max_steps", "epochs", "precision", "seed"):
        if config.get(key) is not None:
            lines.append(f"| {key} | {config[key]} |")
    for key, value in record.get("plan", {}).items():
        if key in ("steps", "global_batch", "learning_rate", "warmup", "processes", "precision"):
            lines.append(f"| {key} (resolved) | {value} |")
    lines += ["", "## Metrics", ""]
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    if shown:
        lines += ["| metric | value |", "| --- | --- |"] + [f"| {k} | {v:.4g} |" for k, v in shown.items()]
    else:
        lines.append("No evaluation was run.")
    lines += ["", "## Use", "", "```python", f"from transformers import AutoTokenizer, {loader}", "",
              'tokenizer = AutoTokenizer.from_pretrained("PATH")', f'model = {loader}.from_pretrained("PATH")',
              "```", "", "With llmkit:", "", "```bash"]
    if objective == "clm":
        lines.append('llmkit generate "Once upon a time" --model PATH')
    elif objective == "mlm":
        lines.append('llmkit fill "The {mask} is bright." --model PATH')
    else:
        lines.append('llmkit classify "some text" --model PATH')
    lines += ["llmkit evaluate --model PATH --eval-data DATA", "```", "", "## Versions", ""]
    lines += [f"- {k}: {v}" for k, v in record.get("versions", versions()).items()]
    return "\n".join(lines) + "\n"
