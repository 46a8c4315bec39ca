"""The `llmkit` command line: each command's flags are generated from its settings dataclass (so flags, recipe
keys and the Python API cannot drift apart), merged with --recipe, validated, and handed to `llmkit.api`.

Heavy libraries are imported only inside commands, so `llmkit --help` starts fast.
"""

from __future__ import annotations

import atexit
import dataclasses
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, NoReturn, Optional

import typer

from llmkit import config as settings
from llmkit import display
from llmkit.errors import LlmkitError

app = typer.Typer(name="llmkit", no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False,
                  rich_markup_mode="markdown",
                  help="Pretrain, fine-tune, evaluate and use transformer language models.\n\n"
                       "Every command takes flags and/or `--recipe FILE.yaml` (flags win) and `--print-config`. "
                       "Add `--debug` anywhere for a traceback on errors.")


def _annotation(cls: type, f: dataclasses.Field) -> tuple[Any, Any]:
    """The Typer annotation and parameter info for one settings field."""
    tp = settings.field_type(cls, f.name)
    inner, is_list = settings._base_type(tp)
    meta = f.metadata
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    help_text = meta["help"]
    if meta.get("choices"):
        help_text += f" One of: {', '.join(meta['choices'])}."
    if default not in (None, [], False) and not meta.get("argument"):
        help_text += f" [default: {default}]"
    if meta.get("argument"):
        return Optional[list[inner]], typer.Argument(help=help_text, show_default=False)
    flag = "--" + f.name.replace("_", "-")
    names = [flag] if inner is not bool else [f"{flag}/--no-{flag[2:]}"]
    if meta.get("short"):
        names.append(meta["short"])
    annotation = Optional[list[inner]] if is_list else Optional[inner]
    metavar = None if inner is bool else {int: "INT", float: "NUMBER"}.get(inner, "TEXT")
    return annotation, typer.Option(*names, help=help_text, show_default=False, metavar=metavar)


def command(name: str, cls: type, run: Callable[[Any], Any], show: Callable[[Any, Any], None], summary: str,
            example: str, launchable: bool = False) -> None:
    """Register `llmkit NAME` with one flag per field of `cls`, plus --recipe and --print-config."""

    def body(**kwargs: Any) -> None:
        invocation = kwargs.pop("ctx").obj  # main()'s argv and --debug, for the launched ranks to run the same
        recipe_path = kwargs.pop("recipe")
        print_config = kwargs.pop("print_config")
        recipe = settings.load_recipe(recipe_path) if recipe_path else None
        cfg = settings.build_config(cls, recipe, kwargs, recipe_name=f"recipe {recipe_path}")
        if print_config:
            display.out.print(settings.to_yaml(cfg), end="", markup=False)
            return
        if launchable:
            from llmkit.launch import needs_launch, relaunch

            if needs_launch(cfg):
                relaunch(cfg, invocation["argv"], invocation["debug"])
                return
        result = run(cfg)
        from llmkit.launch import is_main_process

        if is_main_process():
            show(cfg, result)

    params = []
    common = {f.name for f in dataclasses.fields(settings.Common)}
    ordered = sorted(dataclasses.fields(cls), key=lambda f: f.name in common)  # the command's own flags first
    for f in ordered:
        annotation, info = _annotation(cls, f)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[annotation, info]))
    params.append(inspect.Parameter("recipe", inspect.Parameter.KEYWORD_ONLY, default=None,
                                    annotation=Annotated[Optional[Path], typer.Option(
                                        "--recipe", "-r", help="A YAML recipe; its keys are the long flag names with _ "
                                        "for -. Flags given on the command line win.")]))
    params.append(inspect.Parameter("print_config", inspect.Parameter.KEYWORD_ONLY, default=False,
                                    annotation=Annotated[bool, typer.Option(
                                        "--print-config", help="Print the merged settings as YAML and stop.")]))
    params.append(inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))
    body.__signature__ = inspect.Signature(params)
    body.__annotations__ = {p.name: p.annotation for p in params}
    body.__doc__ = f"{summary}\n\nExample:\n\n    {example}"
    # A command that needs input shows its help when called bare; one that needs none (env, recipes) just runs.
    needs_input = any(f.metadata["required"] or f.metadata["argument"] for f in dataclasses.fields(cls))
    app.command(name, help=body.__doc__, no_args_is_help=needs_input)(body)


# ---------------------------------------------------------------------------------------------------------------
# How each command shows its result


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}


def show_tokenize(cfg: settings.TokenizeConfig, summary: dict[str, Any]) -> None:
    if cfg.json:
        _print_json(summary)
        return
    display.table(f"tokenized into {summary['output']}", summary)


def show_training(cfg: Any, metrics: dict[str, Any]) -> None:
    if cfg.json:
        _print_json(metrics)
        return
    if cfg.dry_run:
        display.table("plan (dry run: nothing was written; FLOPs and memory are estimates)", _scalars(metrics))
        return
    if cfg.quiet:  # the final result only, on one line
        figures = ", ".join(f"{k} {display.fmt(v)}" for k, v in _scalars(metrics).items())
        display.out.print(f"model saved in {cfg.output}: {figures}", markup=False, highlight=False)
        return
    display.table(f"finished: model saved in {cfg.output}", _scalars(metrics))


def show_evaluate(cfg: settings.EvaluateConfig, metrics: dict[str, Any]) -> None:
    if cfg.json:
        _print_json(metrics)
        return
    display.table(f"evaluation of {cfg.model}", _scalars(metrics))
    per_class = metrics.get("per_class")
    if per_class:
        from rich.table import Table

        t = Table(title="per class", header_style="bold")
        for column in ("label", "precision", "recall", "f1", "support"):
            t.add_column(column, justify="left" if column == "label" else "right")
        for label, row in per_class.items():
            t.add_row(label, f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}", str(row["support"]))
        display.out.print(t)
    if metrics.get("confusion_matrix") and per_class:
        names = list(per_class)
        display.out.print("confusion matrix (rows: gold, columns: predicted): " + ", ".join(names))
        for name, row in zip(names, metrics["confusion_matrix"]):
            display.out.print(f"  {name:>12}  " + " ".join(f"{v:6d}" for v in row), markup=False)


def show_classify(cfg: settings.ClassifyConfig, results: list[dict[str, Any]]) -> None:
    for r in results:
        if cfg.json:
            _print_json(r)
            continue
        ranked = r.get("top_k") or [{"label": r["label"], "score": r["score"]}]
        labels = "  ".join(f"{x['label']} {x['score']:.4f}" for x in ranked)
        note = "  (truncated)" if r["truncated"] else ""
        sys.stdout.write(f"{labels}\t{r['text']}{note}\n")


def show_generate(cfg: settings.GenerateConfig, results: list[dict[str, Any]]) -> None:
    if cfg.json:
        for r in results:
            _print_json(r)
        return
    # Written as is (rich would expand tabs and read [brackets] as markup); a blank line between texts.
    texts = [r["prompt"] + completion for r in results for completion in r["completions"]]
    sys.stdout.write("\n\n".join(texts) + "\n")


def show_fill(cfg: settings.FillConfig, results: list[dict[str, Any]]) -> None:
    for r in results:
        if cfg.json:
            _print_json(r)
            continue
        sys.stdout.write(f"{r['filled']}\n")
        for number, ranked in enumerate(r["masks"], start=1):
            sys.stdout.write(f"  mask {number}: " + "  ".join(f"{x['token']} {x['score']:.4f}" for x in ranked) + "\n")


def show_env(cfg: settings.EnvConfig, info: dict[str, Any]) -> None:
    if cfg.json:
        _print_json(info)
        return
    from rich.table import Table

    _pairs("versions", info["versions"])
    devices = Table(title="devices", header_style="bold")
    for column in ("device", "name", "details", "bf16 fast"):
        devices.add_column(column)
    for d in info["devices"]:
        details = f"{d['memory_gb']} GB" if "memory_gb" in d else f"{d['cores']} cores, torch uses {d['torch_threads']}"
        speedup = d.get("bf16_matmul_speedup")
        measured = "" if speedup is None else " (no bf16 instructions)" if not speedup else \
            f" (matmul {speedup:g}x fp32)"
        devices.add_row(d["device"], d["name"], details, ("yes" if d["bf16_fast"] else "no") + measured)
    display.out.print(devices)
    accelerate = info["accelerate_config"]
    if not accelerate["exists"]:
        shown = f"none ({accelerate['path']} does not exist; `accelerate config` writes it)"
    else:
        shown = ", ".join([accelerate["path"], *(f"{k} {v}" for k, v in accelerate.items()
                                                 if k not in ("path", "exists"))])
    _pairs("setup", {"default device": info["default_device"], "--precision auto": info["precision_auto"],
                     "accelerate config": shown, "llmkit cache": info["cache_dir"], "hub": info["hub"]})


def _pairs(title: str, rows: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=title, show_header=False)
    t.add_column(style="bold", no_wrap=True)
    t.add_column(overflow="fold")
    for key, value in rows.items():
        t.add_row(key, str(value))
    display.out.print(t)


def show_recipes(cfg: settings.RecipesConfig, found: list[dict[str, str]]) -> None:
    if cfg.json:
        _print_json(found)
        return
    from rich.table import Table

    t = Table(title="recipes (run one with llmkit COMMAND --recipe PATH)", header_style="bold")
    t.add_column("path", no_wrap=True)
    t.add_column("command", no_wrap=True)
    t.add_column("description", overflow="fold")
    for r in found:
        t.add_row(r["path"], r["command"], r["description"])
    display.out.print(t)


def show_plot(cfg: settings.PlotConfig, path: Path) -> None:
    sys.stdout.write(f"{path}\n")


def _api(name: str) -> Callable[[Any], Any]:
    def run(cfg: Any) -> Any:
        from llmkit import api

        return getattr(api, name)(cfg)
    return run


command("tokenize", settings.TokenizeConfig, _api("tokenize"), show_tokenize,
        "Train a tokenizer (BPE, WordPiece, Unigram) and pre-tokenize data for the other commands.",
        "llmkit tokenize --data corpus.txt --output tok --tokenizer-type bpe --vocab-size 8192")
command("pretrain", settings.PretrainConfig, _api("pretrain"), show_training,
        "Pretrain a language model from scratch (size preset) or continue pretraining a saved one.",
        "llmkit pretrain --data corpus.txt --objective clm --model tiny --max-steps 200 --output runs/lm",
        launchable=True)
command("finetune", settings.FinetuneConfig, _api("finetune"), show_training,
        "Fine-tune a pretrained model for text classification.",
        "llmkit finetune --model runs/lm --data train.tsv --eval-data dev.tsv --epochs 1 --output runs/cls",
        launchable=True)
command("evaluate", settings.EvaluateConfig, _api("evaluate"), show_evaluate,
        "Score a model: perplexity for language models, accuracy, F1 and more for classifiers.",
        "llmkit evaluate --model runs/cls --eval-data dev.tsv --json", launchable=True)
command("classify", settings.ClassifyConfig, _api("classify"), show_classify,
        "Label texts with a fine-tuned classifier (arguments, --file, or - for stdin).",
        'llmkit classify "a gripping, funny film" --model runs/cls --top-k 2')
command("generate", settings.GenerateConfig, _api("generate"), show_generate,
        "Continue a prompt with a causal (GPT-style) language model.",
        'llmkit generate "ROMEO:" --model runs/lm --max-new-tokens 40 --temperature 0.8 --seed 1')
command("fill", settings.FillConfig, _api("fill"), show_fill,
        "Predict the masked words of a text with a masked (BERT-style) language model.",
        'llmkit fill "The {mask} is bright." --model runs/mlm --top-k 5')
command("env", settings.EnvConfig, _api("env"), show_env,
        "Show llmkit's environment: library versions, devices, bf16, accelerate config, cache directory.",
        "llmkit env --json")
command("recipes", settings.RecipesConfig, _api("recipes"), show_recipes,
        "List the shipped recipes: path, command, description.", "llmkit recipes")
command("plot", settings.PlotConfig, _api("plot"), show_plot,
        "Plot training and validation curves of one run or several into one image.",
        "llmkit plot runs/lm runs/lm-big --output curves.png")


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs a command; known errors become one line on stderr and an exit status."""
    given = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in given or os.environ.get("LLMKIT_DEBUG", "") not in ("", "0")
    args = [a for a in given if a != "--debug"]
    atexit.register(_leave_process_group, False)
    try:
        status = app(args=args, prog_name="llmkit", standalone_mode=False, obj={"argv": given, "debug": debug})
        if status == 130:  # typer returns this for a KeyboardInterrupt (Ctrl-C, a second signal) instead of raising
            raise KeyboardInterrupt
        _leave_process_group()
    except LlmkitError as e:
        if debug:
            raise
        _fail(str(e), e.exit_code)
    except typer.Exit as e:
        sys.exit(getattr(e, "exit_code", 0))
    except typer.Abort:
        _fail("aborted", 130)
    except Exception as e:
        if debug:
            raise
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):  # click's usage errors (typer vendors click)
            if not e.format_message():  # a bare command: its help was printed, nothing more to say
                sys.exit(e.exit_code)
            command_name = next((a for a in args if not a.startswith("-")), "")
            _fail(f"{e.format_message()} (see llmkit {command_name} --help)".replace("  ", " "), e.exit_code)
        if isinstance(e, OSError) or _disk_full(e):
            _os_error(e)
        # a bug of ours: one line, and how to see the traceback
        _fail(f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (rerun with --debug "
              "for the traceback, and please report it)", 1)
    except KeyboardInterrupt:
        _fail("interrupted", 130)


def _fail(message: str, code: int) -> NoReturn:
    """One line on stderr and the exit status. A rank of a job that llmkit launched hands both to the launching
    process instead, which prints the line once for the whole job rather than once per rank."""
    from llmkit.launch import hand_over_error

    if not hand_over_error(message, code):
        display.error(message)
    sys.exit(code)


def _leave_process_group(together: bool = True) -> None:
    """The ranks of a launched job leave their process group before they exit: a rank that reaches interpreter
    shutdown with gloo's threads still alive can abort with SIGABRT ("terminate called without an active
    exception", pytorch/pytorch#190489). After a success the ranks first meet at a barrier; after an error
    (`together=False`, from atexit) the group is torn down without waiting for ranks that may never come."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    try:
        if together:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except Exception:  # leaving is best effort: the run's outcome is already decided
        pass


def _disk_full(error: BaseException | None) -> bool:
    """A full disk, however it is reported: an OSError, torch's RuntimeError raised while handling one, or
    safetensors' error text (Rust's "os error 28")."""
    import errno

    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC or f"(os error {errno.ENOSPC})" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _os_error(e: Exception) -> None:
    if _disk_full(e):
        where = getattr(e, "filename", None) or "the output"
        _fail(f"no space left on the device while writing {where}: free disk space or choose another --output; "
              "nothing finished was overwritten", 1)
    else:
        _fail(f"{e.strerror or e}: {e.filename or ''} (rerun with --debug for details)", 1)
