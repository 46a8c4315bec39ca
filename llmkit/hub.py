"""Loading from local directories or the Hugging Face Hub, with one-line errors instead of tracebacks."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from llmkit.errors import LlmkitError


def offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name and Path(name).parent.exists() \
        or name.count("/") > 1


def from_pretrained_or_explain(load: Callable[..., Any], name: str, what: str, **kwargs: Any) -> Any:
    """Call `load(name, **kwargs)`; turn "not found", "offline" and "corrupt" failures into LlmkitError."""
    if looks_like_path(name) and not Path(name).expanduser().exists():
        raise LlmkitError(f"{what} {name} does not exist: check the path")
    from safetensors import SafetensorError  # a truncated or garbled weights file

    try:
        return load(name, **kwargs)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise LlmkitError(explain_load_error(name, what, e)) from e


def explain_load_error(name: str, what: str, error: BaseException) -> str:
    from safetensors import SafetensorError

    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    local = Path(name).expanduser().exists()
    if local:
        if isinstance(error, SafetensorError) or "deserializ" in text.lower():
            return f"the weights in {name} are corrupt or truncated ({text}); re-export or re-download the model"
        return f"could not load the {what} in {name}: {text}"
    if offline():
        return (f"{what} {name!r} is not a local directory, and the Hub is off (HF_HUB_OFFLINE is set): pass a "
                "local directory, or unset HF_HUB_OFFLINE to download it")
    return f"could not load the {what} {name!r} (not a local directory, nor a Hub id that could be fetched: {text})"


def safetensors_only(name: str) -> dict[str, Any]:
    """from_pretrained arguments that read a local model directory's weights from safetensors files only; a
    directory whose weights are only a pickle (pytorch_model.bin) is refused, with how to convert it. A Hub id
    is left to transformers, which prefers safetensors and reads a .bin only with torch.load(weights_only=True)."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return {}
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.glob("pytorch_model*.bin"))  # one file or shards
        if pickled:
            try:
                architecture = (json.loads((path / "config.json").read_text()).get("architectures") or [None])[0]
            except (OSError, ValueError, AttributeError):
                architecture = None
            cls = architecture if isinstance(architecture, str) and architecture.isidentifier() else "AutoModel"
            raise LlmkitError(
                f"{name} holds its weights only as {pickled[0]}, a pickle that can run code when loaded: llmkit "
                "reads model weights only from safetensors; if you trust its source, convert it once with "
                f"`python -c \"from transformers import {cls} as M; M.from_pretrained({str(path)!r})"
                f".save_pretrained({str(path)!r})\"` (writes model.safetensors)")
    return {"use_safetensors": True}
