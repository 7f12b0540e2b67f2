"""Datasets declared in a YAML file, no Python: usable wherever a dataset name is.

A file such as ``configs/datasets/mine.yaml`` names the dataset, its root folder, and either a CSV
listing every image or split folders whose file names a regular expression parses::

    name: mine                  # the dataset's name (the domain of its samples; not a built-in name)
    root: /data/mine            # relative paths: relative to this file's folder
    csv: list.csv               # columns path, pid, camid, split (train | query | gallery); relative to root

    # or, instead of csv:
    pattern: '^(?P<pid>-?\\d+)_c(?P<camid>\\d+)'   # named groups pid and camid (default: Market-style)
    splits: {train: bounding_box_train, query: query, gallery: bounding_box_test}   # folders under root

    distractor_pid: 0           # optional: this pid is kept in the gallery only (Market's 0000); default none

Rules, as for the built-in sets (:mod:`muva_core.data.datasets`): pid ``-1`` is junk and dropped; train
pids are relabelled ``0..N-1``; query and gallery keep theirs. Camera ids are kept as given (integers
``>= 0``; only their equality matters). A split may be left out: a dataset with no train split can only
be a target, one with no query / gallery only a source. With ``pattern``, the expression is matched
(``re.match``) against each image's path relative to its split folder, so ``<pid>/<name>.jpg`` layouts work
too (``'^(?P<pid>\\d+)/c(?P<camid>\\d+)_'``). Paths in the CSV are relative to ``root`` (or absolute).

Every check runs before any work: unknown keys (with the closest known key), a missing root, CSV or split
folder, an unknown split, and every row or file name whose pid or camid does not parse (the file and the
row named, all in one message), listed images that do not exist.

:func:`dataset_name` turns a dataset name or a ``.yaml`` file into the registered name (registering the
file's dataset under its ``name``); :func:`open_dataset` parses either. A file is re-read each time it is
named, so an edited file takes effect.
"""
from __future__ import annotations

import csv
import difflib
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from muva_core.data.datasets import (
    IMAGE_EXTENSIONS,
    SPLITS,
    ReIDDataset,
    canonical_name,
    is_registered,
    list_datasets,
    load_dataset,
    register_dataset,
)
from muva_core.data.samples import DatasetError

__all__ = [
    "DATASET_FILE_SUFFIXES",
    "DEFAULT_PATTERN",
    "DeclaredDataset",
    "DatasetSpec",
    "dataset_name",
    "declared_identity",
    "declared_spec",
    "describe_dataset",
    "is_dataset_file",
    "open_dataset",
    "read_dataset_spec",
    "resolve_dataset_file",
]

DATASET_FILE_SUFFIXES: tuple[str, ...] = (".yaml", ".yml")
DEFAULT_PATTERN = r"^(?P<pid>-?\d+)_c(?P<camid>\d+)"
"""Market-style file names: ``0002_c1s1_000451_03.jpg`` -> pid 2, camid 1."""
KEYS: tuple[str, ...] = ("name", "root", "csv", "pattern", "splits", "distractor_pid", "description")
CSV_COLUMNS: tuple[str, ...] = ("path", "pid", "camid", "split")
MAX_LISTED = 10
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
_INT = re.compile(r"-?\d+")


def is_dataset_file(value) -> bool:
    """Whether ``value`` names a dataset file (a ``.yaml`` / ``.yml`` path) rather than a registered name."""
    return str(value).strip().lower().endswith(DATASET_FILE_SUFFIXES)


def resolve_dataset_file(value: str | os.PathLike) -> Path:
    """The absolute path of a dataset file: as typed when it exists from the working directory, else under the
    project root (as every configuration path), else as typed (the check that follows names it missing)."""
    from muva_core.paths import resolve

    path = Path(os.path.expandvars(str(value).strip())).expanduser()
    if path.is_absolute():
        return path
    if path.is_file():
        return path.resolve()
    return resolve(path)


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset file, checked: ``root`` absolute; ``csv`` (absolute) or ``splits`` (split -> absolute folder)
    with ``pattern``."""

    file: Path
    name: str
    root: Path
    csv: Path | None = None
    pattern: re.Pattern | None = None
    splits: dict[str, Path] = field(default_factory=dict)
    distractor_pid: int | None = None
    description: str = ""

    def where(self) -> str:
        return f"{self.name} ({self.file})"


def _fail(file: Path, message: str) -> DatasetError:
    return DatasetError(f"{file}: {message}")


def read_dataset_spec(path: str | os.PathLike, root: str | os.PathLike | None = None) -> DatasetSpec:
    """Read and check a dataset file (keys, values, that the root, CSV and split folders exist); parses no image.
    ``root`` replaces the file's root (another folder with the same layout)."""
    import yaml

    file = resolve_dataset_file(path)
    if not file.is_file():
        raise DatasetError(f"{file}: dataset file not found (a YAML file declaring name, root and csv or splits; "
                           "see docs/own-images.md)")
    try:
        loaded = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise _fail(file, f"not valid YAML: {err}") from None
    if not isinstance(loaded, dict) or not loaded:
        raise _fail(file, "expected a mapping with keys name, root and csv (or pattern + splits), got "
                          f"{type(loaded).__name__ if loaded is not None else 'an empty file'}")
    for key in loaded:
        if key not in KEYS:
            close = difflib.get_close_matches(str(key), KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise _fail(file, f"unknown key {key!r}{hint} (keys: {', '.join(KEYS)})")
    for key in ("name", "root"):
        if not isinstance(loaded.get(key), str) or not loaded[key].strip():
            raise _fail(file, f"key {key!r} is required (a string), got {loaded.get(key)!r}")
    name = loaded["name"].strip()
    if not _NAME.fullmatch(name):
        raise _fail(file, f"key 'name': {name!r} must start with a letter and hold only letters, digits, '_', '.', "
                          "'-' (it names cache folders and sample keys)")
    if name not in _DECLARED and is_registered(name):
        other = canonical_name(name)
        what = f"the name of {_DECLARED[other]}" if other in _DECLARED else f"a built-in dataset ({other})"
        raise _fail(file, f"key 'name': {name!r} is {what}; choose another name")
    if root is not None:
        root = Path(os.path.abspath(Path(root).expanduser()))
        if not root.is_dir():
            raise _fail(file, f"root folder does not exist: {root} (given instead of the file's key 'root')")
    else:
        root = Path(os.path.expandvars(loaded["root"].strip())).expanduser()
        root = Path(os.path.normpath(root if root.is_absolute() else file.parent / root))
        if not root.is_dir():
            raise _fail(file, f"key 'root': folder does not exist: {root} (a relative root is relative to this "
                              "file's folder)")
    has_csv, has_splits = loaded.get("csv") is not None, loaded.get("splits") is not None
    if has_csv == has_splits:
        raise _fail(file, "give either `csv: <file>` (columns path, pid, camid, split) or `splits: {train: DIR, "
                          "query: DIR, gallery: DIR}` with an optional `pattern:`, " + ("not both" if has_csv else
                                                                                       "got neither"))
    distractor = loaded.get("distractor_pid")
    if distractor is not None and (isinstance(distractor, bool) or not isinstance(distractor, int)):
        raise _fail(file, f"key 'distractor_pid' must be an integer or null, got {distractor!r}")
    description = str(loaded.get("description") or "")
    if has_csv:
        if loaded.get("pattern") is not None:
            raise _fail(file, "key 'pattern' goes with `splits:` folders; a csv gives pid and camid as columns")
        table = Path(str(loaded["csv"])).expanduser()
        table = table if table.is_absolute() else root / table
        if not table.is_file():
            raise _fail(file, f"key 'csv': file does not exist: {table} (a relative path is relative to root)")
        return DatasetSpec(file, name, root, csv=table, distractor_pid=distractor, description=description)
    splits = loaded["splits"]
    if not isinstance(splits, dict) or not splits:
        raise _fail(file, f"key 'splits' must map splits to folders, e.g. {{train: train, query: query, gallery: "
                          f"gallery}}, got {splits!r}")
    folders: dict[str, Path] = {}
    for split, folder in splits.items():
        if split not in SPLITS:
            raise _fail(file, f"key 'splits': unknown split {split!r} (splits are {', '.join(SPLITS)})")
        if not isinstance(folder, str) or not folder.strip():
            raise _fail(file, f"key 'splits.{split}' must be a folder name, got {folder!r}")
        path = Path(folder).expanduser()
        path = path if path.is_absolute() else root / path
        if not path.is_dir():
            raise _fail(file, f"key 'splits.{split}': folder does not exist: {path} (relative to root)")
        folders[split] = path
    text = loaded.get("pattern") or DEFAULT_PATTERN
    try:
        pattern = re.compile(str(text))
    except re.error as err:
        raise _fail(file, f"key 'pattern': not a valid regular expression ({err}): {text!r}") from None
    missing = {"pid", "camid"} - set(pattern.groupindex)
    if missing:
        raise _fail(file, f"key 'pattern' needs the named groups (?P<pid>...) and (?P<camid>...); {text!r} lacks "
                          f"{', '.join(sorted(missing))}")
    return DatasetSpec(file, name, root, pattern=pattern, splits=folders, distractor_pid=distractor,
                       description=description)


def _raise_problems(spec: DatasetSpec, where: str, problems: list[str], what: str) -> None:
    if not problems:
        return
    shown = "\n  ".join(problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    raise DatasetError(f"{spec.where()}: {len(problems)} {what} in {where}:\n  {shown}{more}")


class DeclaredDataset(ReIDDataset):
    """A dataset parsed from its :class:`DatasetSpec` (one subclass per file, registered under its name).

    ``root`` given to the constructor may be None (the file's root) or another folder holding the same
    layout (``muva datasets FILE.yaml --root DIR``)."""

    spec: DatasetSpec
    allow_self = True
    distractor_pid = None
    required_splits = ()

    def __init__(self, root: str | os.PathLike | None = None, verify_images: bool = False) -> None:
        if root is not None and Path(os.path.abspath(Path(root).expanduser())) != self.spec.root:
            self.spec = read_dataset_spec(self.spec.file, root=root)
        self.distractor_pid = self.spec.distractor_pid
        super().__init__(self.spec.root, verify_images=verify_images)

    def resolve_root(self, root: Path) -> Path:
        return root

    def _split_location(self, split: str) -> str:
        if self.spec.csv is not None:
            return f"{self.spec.csv} (rows with split {split})"
        return str(self.spec.splits.get(split, self.spec.root))

    def _parse(self) -> dict[str, list]:
        raw = self._parse_csv() if self.spec.csv is not None else self._parse_folders()
        if not any(raw.values()):
            raise DatasetError(f"{self.spec.where()}: no image in any split")
        return raw

    def _record(self, path: Path, pid: int, camid: int) -> tuple[str, str, int, int]:
        path = Path(os.path.normpath(path))
        try:
            rel = path.relative_to(self.spec.root).as_posix()
        except ValueError:
            rel = os.path.relpath(path, self.spec.root).replace(os.sep, "/")
        return str(path), rel, pid, camid

    def _parse_csv(self) -> dict[str, list]:
        spec, table = self.spec, self.spec.csv
        raw: dict[str, list] = {s: [] for s in SPLITS}
        problems, missing = [], []
        with open(table, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in reader.fieldnames or []]
            absent = [c for c in CSV_COLUMNS if c not in columns]
            if absent:
                raise DatasetError(f"{spec.where()}: {table} lacks the column(s) {', '.join(absent)} (its header is "
                                   f"{', '.join(columns) or 'empty'}; columns: {', '.join(CSV_COLUMNS)})")
            for row_number, row in enumerate(reader, start=2):   # row 1 is the header
                row = {str(k).strip(): (v or "").strip() for k, v in row.items() if k is not None}
                if not any(row.values()):
                    continue
                where = f"row {row_number}"
                split, pid, cam, rel = row["split"], row["pid"], row["camid"], row["path"]
                if split not in SPLITS:
                    problems.append(f"{where}: unknown split {split!r} (split is train, query or gallery)")
                    continue
                bad = _bad_ids(pid, cam)
                if bad:
                    problems.append(f"{where} ({rel}): {bad}")
                    continue
                if not rel:
                    problems.append(f"{where}: empty path")
                    continue
                path = Path(rel).expanduser()
                path = path if path.is_absolute() else spec.root / path
                if not path.is_file():
                    missing.append(f"{where}: {path}")
                    continue
                raw[split].append(self._record(path, int(pid), int(cam)))
        _raise_problems(spec, str(table), problems, "row(s) that do not parse")
        _raise_problems(spec, str(table), missing, "listed image(s) that do not exist")
        return raw

    def _parse_folders(self) -> dict[str, list]:
        spec = self.spec
        raw: dict[str, list] = {}
        for split, folder in spec.splits.items():
            files = sorted((p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                           key=lambda p: p.relative_to(folder).as_posix())
            if not files:
                raise DatasetError(f"{spec.where()}: split '{split}' is empty: no images in {folder} "
                                   f"(suffixes {', '.join(sorted(IMAGE_EXTENSIONS))})")
            problems, recs = [], []
            for path in files:
                rel = path.relative_to(folder).as_posix()
                m = spec.pattern.match(rel)
                if m is None:
                    problems.append(f"{rel}: does not match the pattern {spec.pattern.pattern!r}")
                    continue
                bad = _bad_ids(m.group("pid"), m.group("camid"))
                if bad:
                    problems.append(f"{rel}: {bad}")
                    continue
                recs.append(self._record(path, int(m.group("pid")), int(m.group("camid"))))
            _raise_problems(spec, f"{folder} (split '{split}' of {spec.file}, key 'pattern')", problems,
                            "file name(s) whose pid or camid does not parse")
            raw[split] = recs
        return raw


def _bad_ids(pid: str, camid: str) -> str | None:
    """Why a pid / camid pair does not parse (None when it does): pid an integer >= -1, camid an integer >= 0."""
    if not _INT.fullmatch(pid or ""):
        return f"pid {pid!r} is not an integer"
    if int(pid) < -1:
        return f"pid {pid} is below -1 (-1 marks junk images)"
    if not _INT.fullmatch(camid or "") or int(camid) < 0:
        return f"camid {camid!r} is not an integer >= 0"
    return None


_DECLARED: dict[str, Path] = {}
"""Declared dataset name -> the file read last for it."""


def register_declared(path: str | os.PathLike) -> str:
    """Read a dataset file (checked) and register its dataset under its ``name``; returns the name. The file read
    last for a name wins (the file may have changed, or moved)."""
    spec = read_dataset_spec(path)
    cls = type("DeclaredDataset", (DeclaredDataset,),
               {"spec": spec, "__doc__": f"Declared in {spec.file}."})
    register_dataset(spec.name, replace=True)(cls)
    _DECLARED[spec.name] = spec.file
    return spec.name


def dataset_name(value: str | os.PathLike) -> str:
    """The registered name of a dataset given by name (or alias) or by its ``.yaml`` file."""
    if is_dataset_file(value):
        return register_declared(value)
    return canonical_name(str(value))


def declared_spec(name: str) -> DatasetSpec | None:
    """The spec of a declared dataset registered as ``name``; None for a built-in one."""
    from muva_core.data.datasets import get_dataset_class

    try:
        cls = get_dataset_class(name)
    except ValueError:
        return None
    return getattr(cls, "spec", None) if issubclass(cls, DeclaredDataset) else None


def declared_identity(name: str) -> dict | None:
    """Which copy of a declared dataset a cache entry (pseudo labels) belongs to: its file, root and a digest of
    the file and its CSV, so an edited declaration never reads stale labels. None for a built-in dataset."""
    spec = declared_spec(name)
    if spec is None:
        return None
    digest = hashlib.sha1(spec.file.read_bytes() + (spec.csv.read_bytes() if spec.csv else b"")).hexdigest()[:12]
    return {"file": str(spec.file), "root": str(spec.root), "digest": digest}


def open_dataset(value: str | os.PathLike, root: str | os.PathLike | None = None, **kwargs) -> ReIDDataset:
    """Parse a dataset given by name (``root`` required) or by its ``.yaml`` file (``root`` optional: another
    folder with the file's layout). Keyword arguments go to the parser (``verify_images=True``)."""
    name = dataset_name(value)
    if declared_spec(name) is not None:
        return load_dataset(name, root, **kwargs)
    if root is None:
        raise DatasetError(f"dataset {value!r} needs its root folder (--root DIR); the built-in datasets are "
                           f"{', '.join(n for n in list_datasets() if declared_spec(n) is None)}, or name a "
                           "dataset file (.yaml)")
    return load_dataset(name, root, **kwargs)


def describe_dataset(ds: ReIDDataset) -> str:
    """The split summary of a parsed dataset, the file that declares it, and the queries without a match."""
    lines = [repr(ds)]
    spec = getattr(ds, "spec", None)
    if spec is not None:
        lines.append(f"  declared in {spec.file}")
    if ds.query and ds.gallery:
        unmatched = ds.unmatched_queries()
        if unmatched:
            shown = ", ".join(s.relpath for s in unmatched[:5]) + (" ..." if len(unmatched) > 5 else "")
            lines.append(f"  {len(unmatched)} of {len(ds.query)} query images have no gallery image of the same "
                         f"identity from another camera; the evaluation skips them ({shown})")
        else:
            lines.append("  every query image has a gallery match (same identity, another camera)")
    return "\n".join(lines)
