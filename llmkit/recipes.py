"""Shipped recipes: YAML files whose first line is the command that runs them and whose second says what for."""

from __future__ import annotations

from pathlib import Path

from llmkit import config as settings
from llmkit.errors import UsageError

COMMANDS = {"tokenize": settings.TokenizeConfig, "pretrain": settings.PretrainConfig,
            "finetune": settings.FinetuneConfig, "evaluate": settings.EvaluateConfig,
            "classify": settings.ClassifyConfig}


def recipes_dir() -> Path:
    """recipes/ of the source checkout llmkit runs from (or of the current directory)."""
    here = Path(__file__).resolve().parent.parent / "recipes"
    return here if here.is_dir() else Path.cwd() / "recipes"


def recipe_files(root: Path | None = None) -> list[Path]:
    root = root or recipes_dir()
    return sorted(p for p in root.rglob("*.yaml") if "accelerate" not in p.relative_to(root).parts)


def command_of(path: Path) -> str:
    first = path.read_text(encoding="utf-8").splitlines()[0] if path.stat().st_size else ""
    words = first.lstrip("# ").split()
    if len(words) < 2 or words[0] != "llmkit" or words[1] not in COMMANDS:
        raise UsageError(f"{path} does not start with the command that runs it (`# llmkit COMMAND --recipe ...`)")
    return words[1]


def config_class_of(path: Path) -> type:
    return COMMANDS[command_of(path)]


def describe(path: Path) -> str:
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines[1].lstrip("# ").strip() if len(lines) > 1 and lines[1].startswith("#") else ""
