"""Image pre-scan: decode every image a run needs, once, and report all unreadable files together.

A truncated JPEG found by a DataLoader worker stops a run after minutes (or hours) of work, and
only names the first bad file; a second one needs a second run. :func:`require_readable` instead
decodes every image up front, in parallel, and raises one :class:`UnreadableImagesError` that
lists every unreadable file with its reason and the count::

    from muva_core.data.scan import require_readable

    require_readable([*data.train, *data.query, *data.gallery], cache_dir="data/cache/image-scan")

Each file is fully decoded (``PIL.Image.open(path).load()``, with ``LOAD_TRUNCATED_IMAGES`` off
for the scan), so a file that is cut short fails here, not in training. Threads do the work:
PIL releases the GIL while it decodes.

With ``cache_dir`` the result of each file is kept in ``<cache_dir>/<domain>.json`` keyed by the
file's absolute path, size and modification time (written atomically; JSON, no pickle); a second
scan of unchanged files only ``stat``\\ s them. A changed file (new size or mtime) is decoded again.
Files that cannot be opened for a transient reason (permission denied) are not cached.
"""
from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from muva_core.data.samples import DatasetError, Sample

__all__ = [
    "CACHE_FORMAT",
    "ScanReport",
    "UnreadableImagesError",
    "decode_image",
    "require_readable",
    "scan_images",
]

CACHE_FORMAT = "muva-image-scan/1"
MAX_LISTED = 500
"""At most this many files are named in the error message; with a ``cache_dir`` the full list is
written to ``<cache_dir>/unreadable-<time>.txt`` and the message names that file."""

_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]+")


class UnreadableImagesError(DatasetError):
    """Some images cannot be decoded. ``bad`` maps each file to its reason; the message lists them all."""

    def __init__(self, message: str, bad: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.bad = dict(bad or {})


def decode_image(path: str | os.PathLike) -> str | None:
    """Fully decode one image file; ``None`` when it is readable, else the reason (``"OSError: ..."``)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.width <= 0 or im.height <= 0:
                return f"empty image ({im.width}x{im.height})"
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... depending on the damage
        return f"{type(exc).__name__}: {exc}"
    return None


@dataclass
class ScanReport:
    """The result of :func:`scan_images`.

    total:      distinct image files scanned
    bad:        ``path -> reason`` for every unreadable (or missing) file, in sample order
    decoded:    files decoded by this scan (the rest came from the cache)
    cached:     files whose result was taken from the cache (same size and mtime)
    seconds:    wall time of the scan
    cache_files: the cache files read / written (empty without ``cache_dir``)
    """

    total: int
    bad: dict[str, str] = field(default_factory=dict)
    decoded: int = 0
    cached: int = 0
    seconds: float = 0.0
    cache_files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad

    def reasons(self) -> dict[str, int]:
        """Bad files per kind of reason (the exception name, or ``missing``)."""
        return dict(Counter(_reason_kind(r) for r in self.bad.values()))

    def message(self, what: str = "images", listing: str | None = None) -> str:
        """One message naming every unreadable file with its reason, and the count."""
        if self.ok:
            return f"all {self.total} {what} are readable"
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.reasons().items(), key=lambda kv: -kv[1]))
        lines = [f"{len(self.bad)} of {self.total} {what} cannot be read ({kinds}):"]
        items = list(self.bad.items())
        lines += [f"  {p}: {r}" for p, r in items[:MAX_LISTED]]
        if len(items) > MAX_LISTED:
            rest = f"  ... and {len(items) - MAX_LISTED} more"
            lines.append(rest + (f"; the full list is in {listing}" if listing else ""))
        lines.append("Replace or re-extract these files (or remove them from the dataset folder) and run again; "
                     "every image must decode completely with PIL.")
        return "\n".join(lines)

    def __str__(self) -> str:
        head = (f"image scan: {self.total} files, {len(self.bad)} unreadable "
                f"({self.decoded} decoded, {self.cached} from the cache, {self.seconds:.1f} s)")
        return head if self.ok else head + "\n" + "\n".join(f"  {p}: {r}" for p, r in list(self.bad.items())[:20])

    def raise_if_bad(self, what: str = "images", listing_dir: str | os.PathLike | None = None) -> "ScanReport":
        """Raise :class:`UnreadableImagesError` listing every bad file; return ``self`` when all are readable."""
        if self.ok:
            return self
        listing = None
        if listing_dir is not None and len(self.bad) > MAX_LISTED:
            from muva_core.io import atomic_path

            path = Path(listing_dir) / f"unreadable-{time.strftime('%Y%m%d-%H%M%S')}.txt"
            with atomic_path(path) as tmp:
                tmp.write_text("".join(f"{p}\t{r}\n" for p, r in self.bad.items()))
            listing = str(path)
        raise UnreadableImagesError(self.message(what, listing), self.bad)


def _reason_kind(reason: str) -> str:
    if reason.startswith("file does not exist"):
        return "missing"
    head = reason.split(":", 1)[0]
    if "truncated" in reason.lower():
        return "truncated"
    return head if head.isidentifier() else "unreadable"


def _path_and_group(item: Sample | str | os.PathLike) -> tuple[str, str]:
    if isinstance(item, Sample):
        return os.path.abspath(item.path), item.domain
    return os.path.abspath(os.fspath(item)), "files"


def _cache_file(cache_dir: Path, group: str) -> Path:
    return cache_dir / f"{_UNSAFE.sub('_', group) or 'files'}.json"


def _read_cache(path: Path) -> dict[str, list]:
    """``path -> [size, mtime_ns, reason | None]``; an unreadable or foreign cache file counts as empty."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def _write_cache(path: Path, new: dict[str, list]) -> None:
    """Merge ``new`` into the cache file (re-read first, so concurrent scans of other files are kept)."""
    from muva_core.io import write_json

    files = _read_cache(path)
    files.update(new)
    write_json(path, {"format": CACHE_FORMAT, "files": files}, indent=0)


def _default_workers() -> int:
    return min(32, (os.cpu_count() or 1) + 4)


def scan_images(
    samples: Iterable[Sample | str | os.PathLike],
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool = True,
    desc: str = "scan images",
) -> ScanReport:
    """Decode every image of ``samples`` (:class:`Sample` objects or paths) and report the unreadable ones.

    cache_dir: folder of the scan cache (one JSON file per dataset domain); ``None`` = no cache
    workers:   decoding threads (default ``min(32, cpus + 4)``); 1 decodes in this thread
    progress:  a progress bar over the files that need decoding

    Never raises for a bad image (see :func:`require_readable` for that); a missing file is
    reported as ``file does not exist``.
    """
    from PIL import ImageFile

    t0 = time.perf_counter()
    order: dict[str, str] = {}  # path -> group, first occurrence order
    for item in samples:
        path, group = _path_and_group(item)
        order.setdefault(path, group)

    cache_root = Path(cache_dir) if cache_dir is not None else None
    caches: dict[str, dict[str, list]] = {}
    if cache_root is not None:
        for group in sorted(set(order.values())):
            caches[group] = _read_cache(_cache_file(cache_root, group))

    results: dict[str, str | None] = {}
    todo: list[tuple[str, str, int, int]] = []  # (path, group, size, mtime_ns)
    cached = 0
    for path, group in order.items():
        try:
            st = os.stat(path)
        except FileNotFoundError:
            results[path] = "file does not exist"
            continue
        except OSError as exc:
            results[path] = f"{type(exc).__name__}: {exc}"
            continue
        entry = caches.get(group, {}).get(path)
        if (isinstance(entry, list) and len(entry) == 3 and entry[0] == st.st_size and entry[1] == st.st_mtime_ns):
            results[path] = entry[2]
            cached += 1
        else:
            todo.append((path, group, st.st_size, st.st_mtime_ns))

    if todo:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=desc, unit="img", leave=False)
        truncated_flag = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail here, whatever a library set
        n_workers = max(1, int(workers or _default_workers()))
        try:
            if n_workers == 1 or len(todo) == 1:
                decoded = []
                for item in todo:
                    decoded.append(decode_image(item[0]))
                    if bar is not None:
                        bar.update(1)
            else:
                with ThreadPoolExecutor(max_workers=min(n_workers, len(todo))) as pool:
                    decoded = []
                    for reason in pool.map(decode_image, [t[0] for t in todo], chunksize=1):
                        decoded.append(reason)
                        if bar is not None:
                            bar.update(1)
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = truncated_flag
            if bar is not None:
                bar.close()
        new: dict[str, dict[str, list]] = {}
        for (path, group, size, mtime), reason in zip(todo, decoded):
            results[path] = reason
            if reason is None or not reason.startswith(("PermissionError", "FileNotFoundError")):
                new.setdefault(group, {})[path] = [size, mtime, reason]
        if cache_root is not None:
            for group, entries in new.items():
                _write_cache(_cache_file(cache_root, group), entries)

    bad = {p: results[p] for p in order if results.get(p) is not None}
    files = [str(_cache_file(cache_root, g)) for g in sorted(set(order.values()))] if cache_root is not None else []
    return ScanReport(total=len(order), bad=bad, decoded=len(todo), cached=cached,
                      seconds=time.perf_counter() - t0, cache_files=files)


def require_readable(
    samples: Iterable[Sample | str | os.PathLike] | Sequence,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool = True,
    what: str = "images",
) -> ScanReport:
    """:func:`scan_images`, then raise one :class:`UnreadableImagesError` (a ``ValueError``) naming every
    unreadable file, its reason and the count. Returns the report when every image is readable.

    ``what`` names the images in the message (e.g. ``"images of synth:A2B (train, query, gallery)"``).
    """
    report = scan_images(samples, cache_dir=cache_dir, workers=workers, progress=progress)
    return report.raise_if_bad(what, listing_dir=cache_dir)
