"""Where data comes from: files, directories, globs, saved datasets, llmkit's own tokenized data, the Hub.

Everything here reads; nothing writes. Text files are streamed in large chunks (memory stays flat whatever
the corpus size) and checked as they are read, so that a bad byte is reported with its file and line.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from llmkit.errors import LlmkitError, UsageError
from llmkit.hub import offline

BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".csv": "csv", ".tsv": "csv", ".json": "json",
            ".jsonl": "json", ".parquet": "parquet"}
TEXT_COLUMNS = ("text", "sentence", "content", "document", "review", "sentence1", "question", "prompt")
LABEL_COLUMNS = ("label", "labels", "category", "class", "target", "genre")
TOKENIZED_MARKER = "llmkit_dataset.json"
CHUNK_BYTES = 1 << 23
# GLUE-style .tsv files: tab-separated, no quoting (a quote mark is text); .csv files: RFC 4180 quoting
TSV_DIALECT = {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
CSV_DIALECT = {"delimiter": ",", "quoting": csv.QUOTE_MINIMAL}
# Only an empty cell is missing: pandas' default list would also read the text "NA", "N/A", "null", "None" or
# "nan" - a sentence, or a label so named - as a missing value
PANDAS_CELLS = {"keep_default_na": False, "na_values": [""]}


@dataclass
class Source:
    """One data source: `kind` is file, saved (datasets.save_to_disk), tokenized (llmkit) or hub."""

    kind: str
    name: str
    files: list[Path] = field(default_factory=list)

    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{self.kind}:{self.name if self.kind == 'hub' else ''}".encode())
        for path in self.files:
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK_BYTES):
                    h.update(chunk)
        return h.hexdigest()


def resolve(specs: list[str], flag: str = "--data") -> list[Source]:
    """Turn what the user typed into sources, checking that each exists and is not empty."""
    sources = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_file():
            sources.append(Source("file", spec, [_check_file(path, flag)]))
        elif path.is_dir():
            sources.append(_directory(path, flag))
        elif any(c in spec for c in "*?["):
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not matches:
                raise UsageError(f"{flag} {spec} matches no file: check the pattern")
            sources.append(Source("file", spec, [_check_file(p, flag) for p in matches]))
        elif path.suffix.lower() in BUILDERS or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
            raise UsageError(f"{flag} {spec} does not exist: check the path")
        else:
            if offline():
                raise LlmkitError(f"{flag} {spec} is not a local file, and the Hub is off (HF_HUB_OFFLINE is "
                                  "set): pass a local file, or unset HF_HUB_OFFLINE to download the dataset")
            sources.append(Source("hub", spec))
    return sources


def _check_file(path: Path, flag: str) -> Path:
    suffix = path.suffix.lower()
    if suffix not in BUILDERS:
        raise UsageError(f"{flag} {path}: unsupported file type {suffix or '(none)'}; use .txt, .csv, .tsv, "
                         ".json, .jsonl or .parquet")
    if path.stat().st_size == 0:
        raise LlmkitError(f"{flag} {path} is empty: give a file with data")
    if suffix != ".parquet":
        with open(path, "rb") as f:
            if b"\0" in f.read(8192):
                raise LlmkitError(f"{flag} {path} is a binary file, not text: give a UTF-8 text file")
    return path


def _directory(path: Path, flag: str) -> Source:
    if (path / TOKENIZED_MARKER).is_file():
        return Source("tokenized", str(path), [])
    if (path / "data" / TOKENIZED_MARKER).is_file():
        return Source("tokenized", str(path / "data"), [])
    if any((path / f).is_file() for f in ("state.json", "dataset_dict.json", "dataset_info.json")):
        return Source("saved", str(path), sorted(path.rglob("*.arrow")))
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise UsageError(f"{flag} {path} holds no data files (.txt, .csv, .tsv, .json, .jsonl, .parquet)")
    return Source("file", str(path), [_check_file(p, flag) for p in files])


# ---------------------------------------------------------------------------------------------------------------
# Plain text, streamed.


def read_text_chunks(path: Path) -> Iterator[str]:
    """Decode a text file in large chunks cut at line ends; a bad byte is reported with its line number."""
    line = 1
    carry = b""
    with open(path, "rb") as f:
        while True:
            block = f.read(CHUNK_BYTES)
            data = carry + block
            if not block:
                if data:
                    yield _decode(data, path, line)
                return
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                carry = data
                continue
            piece, carry = data[:cut], data[cut:]
            yield _decode(piece, path, line)
            line += piece.count(b"\n")


def _decode(data: bytes, path: Path, first_line: int) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data[:e.start].count(b"\n")
        raise LlmkitError(f"{path}, line {line}: not valid UTF-8 text; convert the file to UTF-8 "
                          f"(for example: iconv -f latin1 -t utf-8 {path.name})") from None
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    return text.lstrip("\ufeff") if first_line == 1 else text


_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


def text_documents(path: Path, sample_by: str) -> Iterator[str]:
    """Documents of a .txt file: one per line, per blank-line separated paragraph, or the whole file."""
    if sample_by == "document":
        text = "".join(read_text_chunks(path)).strip()
        if text:
            yield text
        return
    pending = ""
    for chunk in read_text_chunks(path):
        if sample_by == "line":
            for doc in chunk.split("\n"):
                if doc.strip():
                    yield doc
            continue
        parts = _PARAGRAPH_BREAK.split(pending + chunk)
        pending = parts.pop()  # may continue in the next chunk
        for doc in parts:
            if doc.strip():
                yield doc.strip("\n")
    if pending.strip():
        yield pending.strip("\n")


def check_utf8(path: Path) -> None:
    for _ in read_text_chunks(path):
        pass


# ---------------------------------------------------------------------------------------------------------------
# Tables (csv, tsv, json, jsonl, parquet, saved datasets, the Hub), through `datasets` (pyarrow alone for a file
# read once).


def cell_text(cell) -> str:
    """A table cell as text for a model: a missing cell as no text, a number (from a .json/.jsonl, .parquet, saved or
    Hub column of numbers; .csv/.tsv cells are read as text) as its digits - a whole float without ".0"."""
    if cell is None:
        return ""
    if isinstance(cell, str):
        return cell
    return str(int(cell)) if isinstance(cell, float) and cell.is_integer() else str(cell)


def load_table(sources: list[Source], trust_remote_code: bool = False):
    """All sources as one `datasets.Dataset` (Arrow, memory-mapped)."""
    return _concatenated([_load_one(s, trust_remote_code) for s in sources], [s.name for s in sources])


def _load_one(source: Source, trust_remote_code: bool):
    import datasets

    datasets.disable_progress_bars()
    if source.kind == "tokenized":
        raise UsageError(f"{source.name} is pre-tokenized language-modelling data: give the raw labeled file "
                         "instead")
    if source.kind == "saved":
        try:
            loaded = datasets.load_from_disk(source.name)
        except Exception as e:  # datasets raises several types for a broken directory
            raise LlmkitError(f"could not read the saved dataset {source.name}: {_first_line(e)}") from None
        if isinstance(loaded, datasets.DatasetDict):
            split = "train" if "train" in loaded else next(iter(loaded))
            loaded = loaded[split]
        return loaded
    if source.kind == "hub":
        spec, _, split = source.name.partition("@")
        name, _, config = spec.partition(":")
        try:
            return datasets.load_dataset(name, config or None, split=split or "train")
        except Exception as e:
            raise LlmkitError(f"could not load the Hub dataset {source.name!r}: {_first_line(e)}") from None
    groups: dict[str, list[Path]] = {}
    for path in source.files:
        groups.setdefault(path.suffix.lower(), []).append(path)
    parts, names = [], []
    for suffix, files in groups.items():
        builder = BUILDERS[suffix]
        kwargs = {}
        if builder != "parquet":
            for path in files:
                check_utf8(path)
        names.append(str(files[0]) if len(files) == 1 else f"the {suffix} files of {source.name}")
        if builder == "text":
            parts.append(datasets.Dataset.from_dict({"text": [d for p in files for d in text_documents(p, "line")]}))
            continue
        try:
            if builder == "csv":
                dialect = TSV_DIALECT if suffix == ".tsv" else CSV_DIALECT
                kwargs = {**dialect, **PANDAS_CELLS, "features": _csv_features(files, dialect)}
            with _library_logs_off():  # datasets logs the parse error it raises; it is reported below, once
                parts.append(datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train",
                                                   **kwargs))
        except Exception as e:
            names = ", ".join(str(p) for p in files)
            if builder == "parquet":  # binary: no header or line to point at
                raise LlmkitError(f"could not parse {names} as Parquet: {_first_line(e)}; give a valid .parquet "
                                  "file") from None
            problem = _first_json_problem(files) if builder == "json" else _header_only(files)
            raise LlmkitError(problem or f"could not parse {names}: {_first_line(e)}; fix the file (every row needs "
                              "the same columns)") from None
    return _concatenated(parts, names)


def _csv_features(files: list[Path], dialect: dict):
    """Every column of .csv/.tsv files as text, named as pandas names them ("Unnamed: 2" for an empty name, "a.1"
    for a repeated one), so that each cell is the text it holds: pandas would read a column of digits as numbers
    ("007" as 7, the labels "02" and "2" as one class). None where the files' columns differ: the builder reports
    that."""
    import datasets
    import pandas as pd

    names = None
    for path in files:
        found = list(pd.read_csv(path, nrows=0, encoding="utf-8", **dialect).columns)
        if names is None:
            names = found
        elif set(found) != set(names):
            return None
    return datasets.Features({name: datasets.Value("string") for name in names})


def _concatenated(parts: list, names: list[str]):
    """Tables with the same columns (`names` name them in errors) as one: a column that holds numbers in one (a
    .jsonl or .parquet file) and text in another (a .csv file) becomes text in all."""
    import datasets

    if len(parts) == 1:
        return parts[0]
    columns = set(parts[0].column_names)
    for where, part in zip(names[1:], parts[1:]):
        if set(part.column_names) != columns:
            raise LlmkitError(f"{where} has columns {sorted(part.column_names)} but {names[0]} has "
                              f"{sorted(columns)}: give sources with the same columns")
    for name in parts[0].column_names:
        if len({repr(p.features[name]) for p in parts}) > 1:
            parts = [p.cast_column(name, datasets.Value("string"))
                     if isinstance(p.features[name], datasets.Value) and p.features[name].dtype != "string" else p
                     for p in parts]
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError as e:
        raise LlmkitError(f"the data's sources hold different kinds of values in a column ({_first_line(e)}): give "
                          "sources whose columns hold the same kinds") from None


def read_file_table(source: Source):
    """A table read once and kept nowhere (`classify --file`): one local .csv, .tsv, .jsonl or .parquet file is
    read by pyarrow alone, without importing `datasets` (0.6-0.9 s of start-up) or writing its cache; its cells
    stay text as written (load_table's do too, except that an empty cell is missing there).
    Any other source, and a file that pyarrow cannot read or that holds no rows, goes through load_table, whose
    errors name the problem (and pandas reads the cells). Returns a pyarrow Table or a datasets.Dataset: both
    have column_names and index by column name."""
    import pyarrow as pa

    if source.kind == "file" and len(source.files) == 1:
        try:
            table = _pyarrow_table(source.files[0])
        except (pa.ArrowException, OSError, csv.Error):  # pyarrow reports a corrupt .parquet as an OSError
            table = None
        if table is not None and table.num_rows:
            return table
    return load_table([source])


def _pyarrow_table(path: Path):
    """The file as a pyarrow Table, every .csv/.tsv column as strings; None for a type pyarrow does not read and
    for a .csv/.tsv that pandas would read differently (no header, a blank name or line in it, a repeated name; a
    line of spaces in a one-column file)."""
    import pyarrow as pa

    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path)
    if suffix not in (".csv", ".tsv", ".jsonl"):
        return None
    check_utf8(path)
    if suffix == ".jsonl":
        import pyarrow.json as pj

        return pj.read_json(path)
    import pyarrow.csv as pc

    dialect = TSV_DIALECT if suffix == ".tsv" else CSV_DIALECT
    with open(path, encoding="utf-8-sig", newline="") as f:  # as GLUE's .tsv files and pandas read them
        header = next(csv.reader(f, **dialect), None)
    # pandas skips a first line of spaces that pyarrow takes as the header, names an empty name "Unnamed: 0" and a
    # repeated one "a.1", and keeps a name of spaces as it is: each goes to load_table, which reads as pandas does
    if not header or any(not name.strip() for name in header) or len(set(header)) < len(header):
        return None
    quoted = dialect["quoting"] != csv.QUOTE_NONE
    parse = pc.ParseOptions(delimiter=dialect["delimiter"], quote_char='"' if quoted else False,
                            newlines_in_values=quoted)
    table = pc.read_csv(path, parse_options=parse,
                        convert_options=pc.ConvertOptions(column_types={name: pa.string() for name in header}))
    # a line of spaces is a row of a one-column file for pyarrow (of a wider one, a parse error) and no row for
    # pandas: such a file, too, goes to load_table
    if table.num_columns == 1:
        import pyarrow.compute as pa_compute  # 40 ms to import: only for such files

        if pa_compute.any(pa_compute.match_substring_regex(table[0], r"^\s+$")).as_py():
            return None
    return table


@contextlib.contextmanager
def _library_logs_off() -> Iterator[None]:
    import datasets

    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)


def _first_json_problem(files: list[Path]) -> str | None:
    """`path, line N: problem` for the first line of a JSON Lines file that is not a JSON object, or None."""
    for path in files:
        if path.suffix.lower() != ".jsonl":
            continue
        number = 0
        for chunk in read_text_chunks(path):
            for text in chunk.splitlines():
                number += 1
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    return f"{path}, line {number}: not valid JSON ({e.msg}); fix the line (one object per line)"
                if not isinstance(row, dict):
                    return (f"{path}, line {number}: a JSON {type(row).__name__}, not an object; give one "
                            '{"text": ..., "label": ...} object per line')
    return None


def _header_only(files: list[Path]) -> str | None:
    """`path holds no rows` for the first table file with a header line and nothing after it, or None."""
    for path in files:
        with open(path, "rb") as f:
            lines = (line for line in f if line.strip())
            if next(lines, None) is not None and next(lines, None) is None:
                return f"{path} holds a header but no rows: give data with examples"
    return None


def _first_line(error: BaseException) -> str:
    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    text = str(cause).strip() or str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def pick_column(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, flag: str,
                where: str, fits=None) -> str:
    """The column the user named, or the first of `candidates` present, or the only column for which `fits(name)`
    holds; else an error listing the columns."""
    from llmkit.config import did_you_mean

    if wanted is not None:
        if wanted not in columns:
            raise UsageError(f"{where} has no column {wanted!r}{did_you_mean(wanted, columns)}; columns: "
                             f"{', '.join(columns)}")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    if fits is not None:
        fitting = [c for c in columns if fits(c)]
        if len(fitting) == 1:
            return fitting[0]
    raise UsageError(f"{where} has no {what} column (looked for {', '.join(candidates)}): pass {flag} NAME; "
                     f"columns: {', '.join(columns)}")


def _holds_words(cells: list) -> bool:
    """Whether a column's cells hold text other than numbers: the text among columns of ids and scores."""
    for cell in cells:
        if isinstance(cell, str) and cell.strip():
            try:
                float(cell)
            except ValueError:
                return True
    return False


def iter_text_batches(sources: list[Source], text_column: str | None, sample_by: str,
                      batch_size: int = 2048, trust_remote_code: bool = False) -> Iterator[list[str]]:
    """Batches of document texts from all sources, streamed."""
    for source in sources:
        if source.kind == "tokenized":
            raise UsageError(f"{source.name} is already tokenized: it cannot be mixed with raw text sources")
        text_files = [p for p in source.files if BUILDERS[p.suffix.lower()] == "text"]
        if source.kind == "file" and len(text_files) == len(source.files):
            for path in text_files:
                batch: list[str] = []
                for doc in text_documents(path, sample_by):
                    batch.append(doc)
                    if len(batch) == batch_size:
                        yield batch
                        batch = []
                if batch:
                    yield batch
            continue
        table = load_table([source], trust_remote_code)
        head = table[:100]
        column = pick_column(table.column_names, text_column, TEXT_COLUMNS, "text", "--text-column", source.name,
                             lambda c: _holds_words(head[c]))
        for batch in table.select_columns([column]).iter(batch_size=batch_size):
            texts = [t for t in map(cell_text, batch[column]) if t.strip()]
            if texts:
                yield texts


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))
