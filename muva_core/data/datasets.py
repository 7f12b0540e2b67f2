"""Person Re-ID dataset parsers and their registry.

Every parser turns a dataset folder on disk into three lists of :class:`Sample`
(``train``, ``query``, ``gallery``), following the conventions of torchreid:

* junk images (pid ``-1``) are dropped from every split;
* distractors (pid ``0`` in Market-style naming) are kept in the gallery only;
* the camera id comes from the file name and is stored 0-based;
* train pids are relabelled ``0..N-1`` in the order of the sorted original ids;
  query and gallery keep their original pids.

Usage::

    ds = load_dataset("market1501", "/data")      # or "market", "MA"; the folder or its parent
    ds.train[0]        # Sample(path=..., pid=0, camid=0, domain='market1501', relpath=...)
    ds.summary()       # pandas table: images / ids / cameras per split

New datasets register with :func:`register_dataset`::

    @register_dataset("mydata", aliases=("md",))
    class MyData(MarketStyleDataset):
        folder_names = ("MyData",)
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence


from muva_core.data.samples import DatasetError, Sample

__all__ = [
    "IMAGE_EXTENSIONS",
    "ReIDDataset",
    "MarketStyleDataset",
    "Market1501",
    "DukeMTMCreID",
    "MSMT17",
    "CUHK03NP",
    "CUHK03NPDetected",
    "CUHK03NPLabeled",
    "SyntheticDomain",
    "register_dataset",
    "get_dataset_class",
    "is_registered",
    "canonical_name",
    "list_datasets",
    "load_dataset",
    "read_image",
    "ImageReadError",
    "combine_train",
    "SourceInfo",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
"""File suffixes treated as images when scanning a split folder (others, e.g. ``Thumbs.db``, are ignored)."""

SPLITS: tuple[str, ...] = ("train", "query", "gallery")


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

_REGISTRY: dict[str, type["ReIDDataset"]] = {}
_ALIASES: dict[str, str] = {}  # normalised alias -> canonical name


def _norm(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


def register_dataset(name: str, aliases: Iterable[str] = (), replace: bool = False) -> Callable[[type], type]:
    """Class decorator: register a parser under ``name`` (its canonical name) and ``aliases``.

    Lookup is case-insensitive and treats ``-`` like ``_``. The canonical name becomes the
    ``domain`` of every sample the parser produces. ``replace=True`` lets a parser take over a name
    registered before (a dataset file read again, :mod:`muva_core.data.declared`).
    """

    def deco(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, ReIDDataset)):
            raise TypeError(f"@register_dataset({name!r}) expects a ReIDDataset subclass, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls and not replace:
            raise ValueError(f"dataset name {name!r} is already registered to {_REGISTRY[name].__name__}")
        for alias in (name, *aliases):
            key = _norm(alias)
            if key in _ALIASES and _ALIASES[key] != name:
                raise ValueError(f"dataset alias {alias!r} is already used by {_ALIASES[key]!r}")
        cls.name = name
        cls.aliases = tuple(aliases)
        _REGISTRY[name] = cls
        for alias in (name, *aliases):
            _ALIASES[_norm(alias)] = name
        return cls

    return deco


def canonical_name(name: str) -> str:
    """The canonical dataset name for ``name`` or one of its aliases (``"MA"`` -> ``"market1501"``)."""
    key = _norm(name)
    if key not in _ALIASES:
        known = ", ".join(
            f"{n} (aliases: {', '.join(c.aliases) or '-'})" for n, c in sorted(_REGISTRY.items())
        )
        raise ValueError(f"unknown dataset {name!r}; registered datasets: {known}")
    return _ALIASES[key]


def is_registered(name: str) -> bool:
    """Whether ``name`` is a registered dataset name or alias (case-insensitive, ``-`` as ``_``)."""
    return _norm(name) in _ALIASES


def get_dataset_class(name: str) -> type["ReIDDataset"]:
    """The parser class registered under ``name`` (or an alias)."""
    return _REGISTRY[canonical_name(name)]


def list_datasets() -> list[str]:
    """Canonical names of all registered datasets, sorted."""
    return sorted(_REGISTRY)


def load_dataset(name: str, root: str | os.PathLike, **kwargs) -> "ReIDDataset":
    """Parse dataset ``name`` found at ``root`` (the dataset folder itself or a parent of it).

    Keyword arguments go to the parser (e.g. ``verify_images=True``).
    """
    return get_dataset_class(name)(root, **kwargs)


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------


class ImageReadError(DatasetError):
    """An image file that cannot be opened or decoded; the message names the file and the reason.

    Raised in a DataLoader worker, torch re-creates the exception in the main process with the
    worker's whole traceback as its message; ``str()`` of such a copy gives back the original
    one-line message (plus which worker), so the command line shows it without the traceback.
    """

    def __str__(self) -> str:
        return _strip_worker_traceback(super().__str__(), type(self).__name__)


_WORKER_RE = re.compile(r"^Caught (\w+) (in DataLoader worker process \d+|in [^\n]*?)\.\nOriginal Traceback", re.S)


def _strip_worker_traceback(text: str, name: str) -> str:
    m = _WORKER_RE.match(text)
    if m is None:
        return text
    marker = f"{name}: "
    lines = text.rstrip("\n").split("\n")
    for i in range(len(lines) - 1, -1, -1):
        head, sep, rest = lines[i].partition(marker)
        if sep and (head == "" or head.endswith(".")) and " " not in head:
            original = "\n".join([rest, *lines[i + 1:]])
            return f"{original} ({m.group(2)})"
    return text


def read_image(path: str | os.PathLike):
    """Open an image as an RGB ``PIL.Image``; raise :class:`ImageReadError` (a :class:`DatasetError`)
    naming the file if it does not exist or cannot be decoded (a truncated JPEG included)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"image file does not exist: {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... depending on the damage
        raise ImageReadError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc


def _verify_images(samples: Sequence[Sample], desc: str) -> None:
    """Decode every image (in parallel); one error lists every unreadable file."""
    from muva_core.data.scan import require_readable

    require_readable(samples, what=f"images of {desc}")


# --------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------

# One parsed image before the junk / distractor / relabelling rules: (abs path, relpath, pid, camid0).
_Raw = tuple[str, str, int, int]


class ReIDDataset:
    """A parsed Re-ID dataset with ``train`` / ``query`` / ``gallery`` lists of :class:`Sample`.

    Subclasses set ``folder_names`` (conventional folder names searched under a parent root),
    implement ``_looks_like(path)`` (is ``path`` the dataset folder?) and ``_parse()``.

    Attributes: ``name`` (canonical, = sample domain), ``root`` (as given), ``dataset_dir``
    (resolved folder), ``train``, ``query``, ``gallery``, ``num_train_pids``, ``num_train_cams``.
    """

    name: str = ""
    aliases: tuple[str, ...] = ()
    folder_names: tuple[str, ...] = ()
    """Sub-folders (relative to a parent root) that may hold the dataset, tried in order."""
    allow_self: bool = True
    """Whether ``root`` itself may be the dataset folder even if its name is not in ``folder_names``."""
    distractor_pid: int | None = 0
    """Original pid of distractors (kept in gallery only); None when the naming has no distractors."""
    junk_pid: int = -1
    required_splits: tuple[str, ...] = SPLITS
    """Splits that must hold images; another split may be absent (no image at all), e.g. a declared dataset
    that is only ever a target (no train split) or only a source (no query / gallery)."""

    def __init__(self, root: str | os.PathLike, verify_images: bool = False) -> None:
        if not self.name:
            raise TypeError(f"{type(self).__name__} is not registered (use @register_dataset)")
        self.root = Path(os.path.abspath(Path(root).expanduser()))
        self.dataset_dir = self.resolve_root(self.root)
        raw = self._parse()
        self.train, self.query, self.gallery = self._apply_rules(raw)
        if verify_images:  # every split at once, so one error names every unreadable file
            _verify_images([s for split in SPLITS for s in getattr(self, split)], desc=f"{self.name} ({', '.join(SPLITS)})")

    # ---- root resolution -------------------------------------------------------------
    def candidate_dirs(self, root: Path) -> list[Path]:
        """Folders tried, in order, as the dataset folder for a given ``root``."""
        cands: list[Path] = []
        if self.allow_self or root.name.lower() in {f.lower() for f in self.folder_names}:
            cands.append(root)
        cands += [root / f for f in self.folder_names]
        out: list[Path] = []
        for c in cands:
            if c not in out:
                out.append(c)
        return out

    def _search(self, root: Path) -> tuple[Path | None, list[str]]:
        """The dataset folder under ``root`` (or None), and each folder tried before it with why not."""
        tried: list[str] = []
        for cand in self.candidate_dirs(root):
            why = self._looks_like(cand) if cand.is_dir() else "does not exist"
            if why is None:
                return cand, tried
            tried.append(f"  {cand}  ({why})")
        return None, tried

    @classmethod
    def folders_tried(cls, root: Path) -> list[str]:
        """``[]`` when the dataset's folder is found under ``root``, else each folder tried and why not (the
        class's folder rules, nothing parsed)."""
        if not root.is_dir():
            return [f"  {root}  (does not exist)"]
        found, tried = cls.__new__(cls)._search(root)
        return [] if found is not None else tried

    def resolve_root(self, root: Path) -> Path:
        """Find the dataset folder: ``root`` itself or a conventional sub-folder of it."""
        if not root.is_dir():
            raise DatasetError(f"{self.name}: root folder does not exist: {root}")
        found, tried = self._search(root)
        if found is not None:
            return found
        raise DatasetError(
            f"{self.name}: cannot find the dataset under {root}; tried:\n" + "\n".join(tried)
        )

    def _looks_like(self, path: Path) -> str | None:
        """None if ``path`` is the dataset folder, else a short reason why not."""
        raise NotImplementedError

    def _parse(self) -> dict[str, list[_Raw]]:
        """Parse ``self.dataset_dir`` into raw records per split (original pids, 0-based camids)."""
        raise NotImplementedError

    # ---- rules -----------------------------------------------------------------------
    def _apply_rules(self, raw: dict[str, list[_Raw]]) -> tuple[list[Sample], list[Sample], list[Sample]]:
        out: dict[str, list[Sample]] = {}
        for split in SPLITS:
            recs = [r for r in raw.get(split, ()) if r[2] != self.junk_pid]
            if split != "gallery" and self.distractor_pid is not None:
                recs = [r for r in recs if r[2] != self.distractor_pid]
            if not recs and split not in self.required_splits and not raw.get(split):
                out[split] = []
                continue
            if not recs:
                where = self._split_location(split)
                raise DatasetError(
                    f"{self.name}: split '{split}' is empty at {where} "
                    f"({len(raw[split])} images found, none usable after dropping junk"
                    f"{' and distractors' if split != 'gallery' and self.distractor_pid is not None else ''})"
                )
            if split == "train":
                relabel = {pid: i for i, pid in enumerate(sorted({r[2] for r in recs}))}
                recs = [(p, rel, relabel[pid], cam) for p, rel, pid, cam in recs]
            out[split] = [Sample(path=p, pid=pid, camid=cam, domain=self.name, relpath=rel) for p, rel, pid, cam in recs]
        return out["train"], out["query"], out["gallery"]

    def _split_location(self, split: str) -> str:
        return str(self.dataset_dir)

    # ---- statistics --------------------------------------------------------------------
    @property
    def num_train_pids(self) -> int:
        return len({s.pid for s in self.train})

    @property
    def num_train_cams(self) -> int:
        return len({s.camid for s in self.train})

    @property
    def num_train_imgs(self) -> int:
        return len(self.train)

    def unmatched_queries(self) -> list[Sample]:
        """Query images with no gallery image of the same identity from another camera: the evaluation
        protocol skips them (they count in ``num_skipped_queries``, not in mAP)."""
        cams: dict[int, set[int]] = {}
        for s in self.gallery:
            cams.setdefault(s.pid, set()).add(s.camid)
        return [q for q in self.query if not cams.get(q.pid, set()) - {q.camid}]

    def stats(self) -> dict[str, dict[str, int]]:
        """``{split: {"images", "ids", "cameras"}}`` counts."""
        return {
            split: {
                "images": len(samples),
                "ids": len({s.pid for s in samples}),
                "cameras": len({s.camid for s in samples}),
            }
            for split, samples in (("train", self.train), ("query", self.query), ("gallery", self.gallery))
        }

    def summary(self):
        """A pandas table of counts per split (rows train/query/gallery; columns images, ids, cameras)."""
        import pandas as pd

        frame = pd.DataFrame.from_dict(self.stats(), orient="index")[["images", "ids", "cameras"]]
        frame.index.name = "split"
        return frame

    def __repr__(self) -> str:
        st = self.stats()
        lines = [
            f"{type(self).__name__}(name={self.name!r}, dir={str(self.dataset_dir)!r})",
            f"  {'split':<8}| {'# ids':>7} | {'# images':>9} | {'# cameras':>9}",
            "  " + "-" * 42,
        ]
        for split in SPLITS:
            c = st[split]
            lines.append(f"  {split:<8}| {c['ids']:>7} | {c['images']:>9} | {c['cameras']:>9}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Market-style folders: bounding_box_train / query / bounding_box_test, names 0002_c1s1_000451_03.jpg
# --------------------------------------------------------------------------------------

_MARKET_PATTERN = re.compile(r"^(-?\d+)_c(\d+)")


def _scan_dir(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    with os.scandir(folder) as it:
        files = [Path(e.path) for e in it if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(files, key=lambda p: p.name)


def _parse_market_name(path: Path, pattern: re.Pattern, max_cam: int | None, dataset: str) -> tuple[int, int]:
    """(original pid, 0-based camid) from a Market-style file name; DatasetError naming the file if it fails."""
    m = pattern.match(path.name)
    if m is None:
        raise DatasetError(
            f"{dataset}: cannot parse file name {path} (expected '<pid>_c<camera>...', e.g. 0002_c1s1_000451_03.jpg)"
        )
    pid, cam = int(m.group(1)), int(m.group(2))
    if pid < -1:
        raise DatasetError(f"{dataset}: invalid pid {pid} in file name {path}")
    if cam < 1 or (max_cam is not None and cam > max_cam):
        rng = f"1..{max_cam}" if max_cam is not None else ">= 1"
        raise DatasetError(f"{dataset}: camera id {cam} out of range {rng} in file name {path}")
    return pid, cam - 1


class MarketStyleDataset(ReIDDataset):
    """Market-1501 folder layout and naming; subclasses set ``folder_names`` and ``max_cam``."""

    split_dirs: dict[str, str] = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
    pattern: re.Pattern = _MARKET_PATTERN
    max_cam: int | None = None
    subdir: str = ""
    """Extra folder between the dataset folder and the split folders (CUHK03-NP: ``detected``)."""

    def _base(self, path: Path) -> Path:
        return path / self.subdir if self.subdir else path

    def _looks_like(self, path: Path) -> str | None:
        marker = self._base(path) / self.split_dirs["train"]
        return None if marker.is_dir() else f"no {marker.relative_to(path).as_posix()}/ folder"

    def _split_location(self, split: str) -> str:
        return str(self._base(self.dataset_dir) / self.split_dirs[split])

    def _parse(self) -> dict[str, list[_Raw]]:
        base = self._base(self.dataset_dir)
        raw: dict[str, list[_Raw]] = {}
        for split in SPLITS:
            folder = base / self.split_dirs[split]
            if not folder.is_dir():
                raise DatasetError(f"{self.name}: missing folder {folder} (split '{split}')")
            files = _scan_dir(folder)
            if not files:
                raise DatasetError(f"{self.name}: split '{split}' is empty: no images in {folder}")
            recs: list[_Raw] = []
            for f in files:
                pid, cam = _parse_market_name(f, self.pattern, self.max_cam, self.name)
                recs.append((str(f), f.relative_to(self.dataset_dir).as_posix(), pid, cam))
            raw[split] = recs
        return raw


@register_dataset("market1501", aliases=("market", "MA", "market-1501", "market_1501"))
class Market1501(MarketStyleDataset):
    """Market-1501 (Zheng et al., ICCV 2015): 751 train ids, 6 cameras; 0000 = distractor, -1 = junk."""

    folder_names = (
        "Market-1501-v15.09.15",
        "market1501/Market-1501-v15.09.15",
        "market1501",
        "Market-1501",
        "Market1501",
        "market",
    )
    max_cam = 6


@register_dataset("dukemtmcreid", aliases=("duke", "D", "dukemtmc", "dukemtmc-reid", "dukemtmc_reid"))
class DukeMTMCreID(MarketStyleDataset):
    """DukeMTMC-reID (Zheng et al., ICCV 2017): 702 train ids, 8 cameras; names ``0005_c2_f0046985.jpg``."""

    folder_names = (
        "DukeMTMC-reID",
        "dukemtmc-reid/DukeMTMC-reID",
        "dukemtmc-reid",
        "dukemtmcreid",
        "DukeMTMC",
        "duke",
    )
    max_cam = 8


@register_dataset("msmt17", aliases=("MS", "msmt", "msmt17_v1", "msmt17_v2"))
class MSMT17(MarketStyleDataset):
    """MSMT17 (Wei et al., CVPR 2018): 1041 train ids, 15 cameras. Two layouts are accepted:

    * list files (V1, and V2 with ``mask_train_v2`` / ``mask_test_v2``): ``train/`` and ``test/``
      image folders plus ``list_{train,val,query,gallery}.txt`` with lines ``"relpath pid"``;
      the camera is the 3rd ``_`` field of the file name (``0000_000_01_0303morning_0008_0.jpg``
      -> camera 1), 1-based. Train = list_train + list_val (as torchreid does).
    * a Market-style conversion (``bounding_box_train`` / ``query`` / ``bounding_box_test``).

    MSMT17 pid 0 is a real identity (no distractors); pid -1 would still be dropped as junk.
    """

    folder_names = (
        "MSMT17_V1",
        "MSMT17_V2",
        "MSMT17",
        "msmt17/MSMT17_V1",
        "msmt17/MSMT17_V2",
        "msmt17",
    )
    max_cam = 15
    distractor_pid = None
    list_files = {"train": ("list_train.txt", "list_val.txt"), "query": ("list_query.txt",), "gallery": ("list_gallery.txt",)}
    image_dirs = {"train": ("train", "mask_train_v2"), "query": ("test", "mask_test_v2"), "gallery": ("test", "mask_test_v2")}

    def _looks_like(self, path: Path) -> str | None:
        if (path / "list_train.txt").is_file() or (path / self.split_dirs["train"]).is_dir():
            return None
        return "no list_train.txt and no bounding_box_train/ folder"

    @property
    def layout(self) -> str:
        """``"lists"`` (V1/V2 list files) or ``"market"`` (a Market-style conversion)."""
        return "lists" if (self.dataset_dir / "list_train.txt").is_file() else "market"

    def _split_location(self, split: str) -> str:
        if self.layout == "market":
            return super()._split_location(split)
        return " + ".join(str(self.dataset_dir / f) for f in self.list_files[split])

    def _parse(self) -> dict[str, list[_Raw]]:
        if self.layout == "market":
            return super()._parse()
        raw: dict[str, list[_Raw]] = {}
        for split in SPLITS:
            img_dir = next((self.dataset_dir / d for d in self.image_dirs[split] if (self.dataset_dir / d).is_dir()), None)
            if img_dir is None:
                tried = " or ".join(str(self.dataset_dir / d) for d in self.image_dirs[split])
                raise DatasetError(f"{self.name}: missing image folder {tried} (split '{split}')")
            recs: list[_Raw] = []
            for list_name in self.list_files[split]:
                recs += self._parse_list(self.dataset_dir / list_name, img_dir)
            if not recs:
                raise DatasetError(f"{self.name}: split '{split}' is empty: no entries in {self._split_location(split)}")
            raw[split] = recs
        return raw

    def _parse_list(self, list_path: Path, img_dir: Path) -> list[_Raw]:
        if not list_path.is_file():
            raise DatasetError(f"{self.name}: missing list file {list_path}")
        recs: list[_Raw] = []
        missing: list[str] = []
        with open(list_path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                line = line.strip()
                if not line:
                    continue
                parts = line.split()
                if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
                    raise DatasetError(
                        f"{self.name}: cannot parse {list_path} line {lineno}: {line!r} (expected '<relpath> <pid>')"
                    )
                rel, pid = parts[0], int(parts[1])
                fields = Path(rel).name.split("_")
                if len(fields) < 3 or not fields[2].isdigit():
                    raise DatasetError(
                        f"{self.name}: cannot parse camera from file name {rel!r} at {list_path} line {lineno} "
                        f"(expected e.g. 0000_000_01_0303morning_0008_0.jpg)"
                    )
                cam = int(fields[2])
                if not 1 <= cam <= self.max_cam:
                    raise DatasetError(
                        f"{self.name}: camera id {cam} out of range 1..{self.max_cam} in {rel!r} at {list_path} line {lineno}"
                    )
                path = img_dir / rel
                if not path.is_file():
                    missing.append(f"{path} ({list_path.name} line {lineno})")
                    continue
                recs.append((str(path), path.relative_to(self.dataset_dir).as_posix(), pid, cam - 1))
        if missing:
            shown = "\n  ".join(missing[:5])
            more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise DatasetError(f"{self.name}: {len(missing)} image(s) listed in {list_path} do not exist:\n  {shown}{more}")
        return recs


class CUHK03NP(MarketStyleDataset):
    """CUHK03-NP (new protocol, Zhong et al. 2017): 767 train ids, 2 cameras, ``.png`` images.

    Folder ``cuhk03-np/{detected,labeled}/{bounding_box_train,query,bounding_box_test}``; names
    ``0001_c1_1.png``. ``relpath`` is relative to the ``cuhk03-np`` folder and so starts with the
    subset (``detected/bounding_box_train/...``). ``root`` may also be the subset folder itself.
    """

    folder_names = ("cuhk03-np", "cuhk03_np", "CUHK03-NP", "cuhk03/cuhk03-np", "cuhk03")
    max_cam = 2
    subdir = "detected"

    def candidate_dirs(self, root: Path) -> list[Path]:
        cands = super().candidate_dirs(root)
        if root.name == self.subdir:  # root given as .../cuhk03-np/detected
            cands.insert(0, root.parent)
        return cands


@register_dataset("cuhk03_np", aliases=("cuhk03", "C3", "cuhk03np", "cuhk03_np_detected", "cuhk03_detected"))
class CUHK03NPDetected(CUHK03NP):
    """CUHK03-NP, detected boxes (the paper's C3)."""

    subdir = "detected"


@register_dataset("cuhk03_np_labeled", aliases=("cuhk03_labeled", "C3L", "cuhk03np_labeled"))
class CUHK03NPLabeled(CUHK03NP):
    """CUHK03-NP, manually labelled boxes."""

    subdir = "labeled"


class SyntheticDomain(MarketStyleDataset):
    """A synthetic domain written by :mod:`muva_core.data.synthetic`: Market layout under ``<root>/synth_X/``.

    ``root`` may be the ``synth_X`` folder itself or the common parent of all synthetic domains;
    a folder with another name is not taken for this domain (so one parent serves A..D safely).
    """

    allow_self = False


for _letter in "ABCD":
    _name = f"synth_{_letter}"
    register_dataset(_name, aliases=(f"synth{_letter}", f"synth:{_letter}"))(
        type(f"Synth{_letter}", (SyntheticDomain,), {"folder_names": (_name,), "__doc__": f"Synthetic domain {_letter}."})
    )
del _letter, _name


# --------------------------------------------------------------------------------------
# Multi-source combination
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceInfo:
    """Where one source dataset landed in a combined training set."""

    domain: str
    pid_offset: int
    cam_offset: int
    num_pids: int
    num_cams: int
    num_images: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def combine_train(datasets: Sequence[ReIDDataset]) -> tuple[list[Sample], dict[str, SourceInfo]]:
    """Merge the train splits of several datasets so identities and cameras never collide.

    Source ``i`` has its (relabelled) pids shifted by the total pid count of sources ``< i`` and
    its camids by the total camera range (max camid + 1) of sources ``< i``; each sample keeps
    its source ``domain``. Returns ``(samples, info)`` with ``info[domain]`` a :class:`SourceInfo`.
    """
    if not datasets:
        raise ValueError("combine_train needs at least one dataset")
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"combine_train got the same dataset twice: {names}")
    samples: list[Sample] = []
    info: dict[str, SourceInfo] = {}
    pid_off = cam_off = 0
    for ds in datasets:
        num_pids = max(s.pid for s in ds.train) + 1  # train pids are 0..N-1
        num_cams = max(s.camid for s in ds.train) + 1
        samples += [
            Sample(path=s.path, pid=s.pid + pid_off, camid=s.camid + cam_off, domain=s.domain, relpath=s.relpath)
            for s in ds.train
        ]
        info[ds.name] = SourceInfo(ds.name, pid_off, cam_off, num_pids, num_cams, len(ds.train))
        pid_off += num_pids
        cam_off += num_cams
    return samples, info
