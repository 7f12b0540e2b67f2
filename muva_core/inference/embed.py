"""Embedding images with a trained run: the evaluation feature of every image of a folder, a glob or a list.

The feature is the one :func:`muva_core.train.run.evaluate_model` ranks with: the BN-neck output,
L2-normalised, of the run's test transform (:func:`muva_core.eval.features.extract_features`), or the same
from an ``export-onnx`` file run by ONNX Runtime (equal to 1e-4)::

    embedder = load_embedder(run="reports/synth_A2B/run-2e76cf80")          # or onnx="muva.onnx"
    result = embed_images("crops/", "crops.parquet", embedder)

Feature files (:func:`write_features` / :func:`read_features`), written atomically:

* ``.parquet``: columns ``path`` (absolute), ``feature`` (a list of float32) and, where a file name parses as
  Market-style (``0002_c3s1_000451_03.jpg``), ``pid`` and ``camid`` (0-based, as the dataset parsers; null
  where the name does not parse); the schema's metadata ``muva`` holds the JSON of :attr:`FeatureTable.meta`;
* ``.npz``: arrays ``path``, ``feature [N, D]``, ``pid``, ``camid``, ``has_ids`` and ``meta`` (JSON); read
  with ``np.load(..., allow_pickle=False)``.

:class:`FeatureCache` keeps features by file path, size and modification time (per model), so a second
search over the same gallery embeds nothing.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import ConfigError, RunConfig
from ..data.datasets import IMAGE_EXTENSIONS, MarketStyleDataset
from ..data.samples import Sample

__all__ = [
    "FEATURE_FORMAT",
    "FEATURE_SUFFIXES",
    "EmbedResult",
    "Embedder",
    "FeatureCache",
    "FeatureTable",
    "collect_images",
    "embed_images",
    "image_samples",
    "is_feature_file",
    "load_embedder",
    "market_ids",
    "read_features",
    "write_features",
]

FEATURE_SUFFIXES: tuple[str, ...] = (".parquet", ".npz")
FEATURE_FORMAT = "muva-features/1"
FEATURE_KIND = "BN-neck feature, L2-normalised (the evaluation feature)"
IMAGES_DOMAIN = "images"


# ---------------------------------------------------------------------------- images
def collect_images(spec: str | os.PathLike | Sequence[str | os.PathLike], what: str = "--images") -> list[Path]:
    """The image files of ``spec``: one image file, a folder (every image under it, sorted), a glob pattern
    (``'crops/**/*.jpg'``), or a list of these. Images are the suffixes of ``IMAGE_EXTENSIONS``. An error names
    ``what`` and the spec when nothing is found."""
    if isinstance(spec, (list, tuple)):
        out = [p for item in spec for p in collect_images(item, what)]
        return list(dict.fromkeys(out))
    text = os.path.expanduser(str(spec))
    path = Path(text)
    if path.is_file():
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise ValueError(f"{what} {spec}: not an image file (suffixes {', '.join(sorted(IMAGE_EXTENSIONS))})")
        return [path]
    if path.is_dir():
        found = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                       key=lambda p: p.as_posix())
    elif glob.has_magic(text):
        found = sorted((Path(p) for p in glob.glob(text, recursive=True)
                        if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_EXTENSIONS), key=lambda p: p.as_posix())
    else:
        raise FileNotFoundError(f"{what} {spec}: no such file or folder (give an image, a folder of images or a "
                                "quoted glob such as 'crops/*.jpg')")
    if not found:
        raise FileNotFoundError(f"{what} {spec}: no images found (suffixes {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return found


def market_ids(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(pid, camid)`` of a Market-style file name (``0002_c3s1_000451_03.jpg`` -> ``(2, 2)``: camid 0-based, as
    the dataset parsers store it), or None when the name does not parse."""
    m = MarketStyleDataset.pattern.match(Path(path).name)
    if m is None or int(m.group(2)) < 1:
        return None
    return int(m.group(1)), int(m.group(2)) - 1


def image_samples(paths: Sequence[str | os.PathLike]) -> list[Sample]:
    """Samples of loose image files (domain ``images``; pid / camid from Market-style names, else -1 / -1)."""
    out = []
    for p in paths:
        path = os.path.abspath(p)
        ids = market_ids(path) or (-1, -1)
        out.append(Sample(path=path, pid=ids[0], camid=ids[1], domain=IMAGES_DOMAIN, relpath=Path(path).as_posix()))
    return out


# ---------------------------------------------------------------------------- embedders
def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"file": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclass
class Embedder:
    """Features of samples with a trained run's model (``kind`` ``torch``) or an exported ONNX file (``onnx``).

    cfg:      the configuration whose test transform prepares the images (size, normalisation, resize)
    model:    the :class:`MUVAReID` (torch; also what predicts part masks) or None
    session:  the ONNX Runtime session (onnx) or None
    meta:     what a feature file records about the model (kind, model file, run, config hash, feature dim)
    """

    kind: str
    cfg: RunConfig
    device: object
    model: object = None
    session: object = None
    meta: dict = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        return int(self.meta["feature_dim"])

    @property
    def cache_key(self) -> str:
        """Names this model's feature cache: the model file (path, size, date), the transform and the device."""
        return hashlib.sha1(json.dumps({**self.meta, "device": str(self.device)}, sort_keys=True).encode()).hexdigest()[:16]

    def __call__(self, samples: Sequence[Sample], progress: bool = True, desc: str = "features") -> np.ndarray:
        if not samples:
            return np.zeros((0, self.feature_dim), dtype=np.float32)
        if self.kind == "torch":
            from ..eval.features import extract_features

            feats = extract_features(self.model.encoder, list(samples), self.cfg, self.device, progress=progress,
                                     desc=desc)
            return feats.numpy().astype(np.float32)
        from tqdm.auto import tqdm

        from ..eval.features import test_loader
        from ..export import run_onnx

        out = [run_onnx(self.session, batch["image"])
               for batch in tqdm(test_loader(list(samples), self.cfg), desc=desc, disable=not progress, leave=False)]
        return np.concatenate(out).astype(np.float32)


def load_embedder(run: str | os.PathLike | None = None, onnx: str | os.PathLike | None = None,
                  device: str | None = None, checkpoint: str | os.PathLike | None = None) -> Embedder:
    """The embedder of a run folder (its ``model.safetensors``), or of an ``export-onnx`` file run by ONNX Runtime
    (``onnx``; with ``run`` too, the file must match the run's input size and normalisation, and the run's test
    resize is used; alone, the file's metadata gives them)."""
    from ..config import config_hash

    if run is None and onnx is None:
        raise ConfigError("give the trained run (--run RUN) or an exported model (--onnx MODEL.onnx)")
    cfg = model = None
    meta: dict = {"feature": FEATURE_KIND}
    if run is not None:
        from .runs import load_run_model, model_file

        from ..eval.features import resolve_device

        cfg, model = load_run_model(run, checkpoint, device="cpu" if onnx else device)
        meta.update(run=str(Path(run).resolve()), config_hash=config_hash(cfg), model=_stamp(model_file(run, checkpoint)),
                    feature_dim=int(model.encoder.feat_dim), metric=cfg.eval.metric)
        if onnx is None:
            dev = resolve_device(device or cfg.device)
            meta.update(kind="torch", transform=[cfg.data.height, cfg.data.width, cfg.data.norm, cfg.data.test_resize])
            return Embedder("torch", cfg, dev, model=model, meta=meta)
    from ..export import onnx_session, read_onnx_metadata

    path = Path(onnx)
    if not path.is_file():
        raise FileNotFoundError(f"--onnx {onnx}: no such file (write one with `muva export-onnx --run RUN --out FILE`)")
    info = read_onnx_metadata(path)
    missing = [k for k in ("image_size", "norm", "feature_dim") if k not in info]
    if missing:
        raise ValueError(f"--onnx {path}: not a `muva export-onnx` file (its metadata lacks {', '.join(missing)})")
    size, norm = [int(v) for v in info["image_size"]], str(info["norm"])
    if cfg is not None:
        if size != [cfg.data.height, cfg.data.width] or norm != cfg.data.norm or int(info["feature_dim"]) != meta["feature_dim"]:
            raise ValueError(f"--onnx {path} (input {size[0]}x{size[1]}, norm {norm}, {info['feature_dim']}-d) does not "
                             f"match the run {run} (input {cfg.data.height}x{cfg.data.width}, norm {cfg.data.norm}, "
                             f"{meta['feature_dim']}-d)")
    else:
        cfg = RunConfig().update({"height": size[0], "width": size[1], "norm": norm, "device": "cpu",
                                  "test_resize": str(info.get("test_resize", RunConfig().data.test_resize))},
                                 source=f"{path} metadata")
        meta.update(feature_dim=int(info["feature_dim"]), metric=RunConfig().eval.metric)
        if info.get("config_hash"):
            meta["config_hash"] = str(info["config_hash"])
    meta.update(kind="onnx", onnx=_stamp(path), transform=[cfg.data.height, cfg.data.width, cfg.data.norm,
                                                             cfg.data.test_resize])
    return Embedder("onnx", cfg, "cpu", model=model, session=onnx_session(path), meta=meta)


# ---------------------------------------------------------------------------- feature files
@dataclass
class FeatureTable:
    """Features of image files: ``paths`` (str), ``features [N, D]`` float32, ``pid`` / ``camid`` (int arrays,
    meaningful where ``has_ids``), and ``meta`` (the model that made them)."""

    paths: list[str]
    features: np.ndarray
    pid: np.ndarray
    camid: np.ndarray
    has_ids: np.ndarray
    meta: dict = field(default_factory=dict)

    @classmethod
    def of(cls, samples: Sequence[Sample], features: np.ndarray, meta: dict):
        ids = [market_ids(s.path) for s in samples]
        return cls(paths=[str(s.path) for s in samples],
                   features=np.asarray(features, dtype=np.float32),
                   pid=np.array([i[0] if i else -1 for i in ids], dtype=np.int64),
                   camid=np.array([i[1] if i else -1 for i in ids], dtype=np.int64),
                   has_ids=np.array([i is not None for i in ids], dtype=bool), meta=dict(meta))

    def __len__(self) -> int:
        return len(self.paths)


def is_feature_file(value: str | os.PathLike) -> bool:
    return Path(value).suffix.lower() in FEATURE_SUFFIXES


def _check_out(out: str | os.PathLike, what: str = "--out") -> Path:
    out = Path(out)
    if out.suffix.lower() not in FEATURE_SUFFIXES:
        raise ValueError(f"{what} {out}: the feature file must end in .parquet or .npz")
    if out.is_dir():
        raise ValueError(f"{what} {out}: is a folder; give a file name ending in .parquet or .npz")
    return out


def write_features(path: str | os.PathLike, table: FeatureTable) -> Path:
    """Write ``table`` as ``.parquet`` or ``.npz`` (by suffix), atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..io import atomic_path

    path = _check_out(path)
    meta = {"format": FEATURE_FORMAT, **table.meta}
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".npz":
            with open(tmp, "wb") as fh:
                np.savez(fh, path=np.array(table.paths, dtype=str), feature=table.features, pid=table.pid,
                         camid=table.camid, has_ids=table.has_ids, meta=np.array(json.dumps(meta)))
        else:
            dim = table.features.shape[1] if table.features.ndim == 2 else 0
            offsets = pa.array(np.arange(len(table) + 1, dtype=np.int32) * dim, type=pa.int32())
            columns = {"path": pa.array(table.paths, type=pa.string()),
                       "feature": pa.ListArray.from_arrays(offsets, pa.array(table.features.reshape(-1), pa.float32()))}
            if table.has_ids.any():
                columns["pid"] = pa.array(table.pid, mask=~table.has_ids, type=pa.int64())
                columns["camid"] = pa.array(table.camid, mask=~table.has_ids, type=pa.int64())
            arrow = pa.table(columns).replace_schema_metadata({"muva": json.dumps(meta)})
            pq.write_table(arrow, tmp)
    return path


def read_features(path: str | os.PathLike, what: str = "features") -> FeatureTable:
    """Read a feature file written by :func:`write_features` (``muva embed``); errors name the file."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such feature file")
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                return FeatureTable([str(p) for p in z["path"]], z["feature"].astype(np.float32), z["pid"],
                                    z["camid"], z["has_ids"].astype(bool), meta)
        arrow = pq.read_table(path)
        meta = json.loads((arrow.schema.metadata or {}).get(b"muva", b"{}"))
        n = arrow.num_rows
        flat = arrow.column("feature").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        features = flat.astype(np.float32).reshape(n, -1) if n else np.zeros((0, int(meta.get("feature_dim", 0))), np.float32)
        if "pid" in arrow.column_names:
            pid, camid = arrow.column("pid").to_pandas(), arrow.column("camid").to_pandas()
            has = pid.notna().to_numpy()
            pid, camid = pid.fillna(-1).astype(np.int64).to_numpy(), camid.fillna(-1).astype(np.int64).to_numpy()
        else:
            has, pid, camid = np.zeros(n, bool), np.full(n, -1, np.int64), np.full(n, -1, np.int64)
        return FeatureTable([str(p) for p in arrow.column("path").to_pylist()], features, pid, camid, has, meta)
    except (KeyError, ValueError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"{what} {path}: not a feature file written by `muva embed` ({type(err).__name__}: {err})") from None


# ---------------------------------------------------------------------------- the feature cache
class FeatureCache:
    """Features of image files under ``<folder>/<embedder cache key>.parquet``, keyed by absolute path, size and
    modification time: :meth:`features` embeds only the files that are new or changed, and remembers them."""

    COLUMNS = ("path", "size", "mtime_ns", "feature")

    def __init__(self, folder: str | os.PathLike, embedder: Embedder) -> None:
        self.embedder = embedder
        self.path = Path(folder) / f"{embedder.cache_key}.parquet"

    def _load(self) -> dict[str, tuple[int, int, np.ndarray]]:
        import pyarrow.parquet as pq

        if not self.path.is_file():
            return {}
        try:
            arrow = pq.read_table(self.path)
            n = arrow.num_rows
            flat = arrow.column("feature").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            feats = flat.astype(np.float32).reshape(n, -1) if n else np.zeros((0, self.embedder.feature_dim), np.float32)
            return {p: (s, m, f) for p, s, m, f in zip(arrow.column("path").to_pylist(), arrow.column("size").to_pylist(),
                                                       arrow.column("mtime_ns").to_pylist(), feats)}
        except (OSError, ValueError, KeyError):
            return {}    # an unreadable cache is rebuilt

    def features(self, samples: Sequence[Sample], progress: bool = True, desc: str = "features") -> tuple[np.ndarray, int]:
        """``(features [N, D], number embedded now)`` of ``samples`` (the rest come from the cache)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from ..io import atomic_path

        entries = self._load()
        stats = [os.stat(s.path) for s in samples]
        keys = [os.path.abspath(s.path) for s in samples]
        todo = [i for i, (k, st) in enumerate(zip(keys, stats))
                if k not in entries or entries[k][:2] != (st.st_size, st.st_mtime_ns)]
        out = np.zeros((len(samples), self.embedder.feature_dim), dtype=np.float32)
        pending = set(todo)
        for i, k in enumerate(keys):
            if i not in pending:
                out[i] = entries[k][2]
        if todo:
            new = self.embedder([samples[i] for i in todo], progress=progress, desc=desc)
            for j, i in enumerate(todo):
                out[i] = new[j]
                entries[keys[i]] = (stats[i].st_size, stats[i].st_mtime_ns, new[j])
            paths = list(entries)
            feats = np.stack([entries[p][2] for p in paths]).astype(np.float32)
            dim = feats.shape[1]
            table = pa.table({"path": paths, "size": pa.array([entries[p][0] for p in paths], pa.int64()),
                              "mtime_ns": pa.array([entries[p][1] for p in paths], pa.int64()),
                              "feature": pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1), pa.float32()), dim)})
            with atomic_path(self.path) as tmp:
                pq.write_table(table, tmp)
        return out, len(todo)


# ---------------------------------------------------------------------------- muva embed
@dataclass
class EmbedResult:
    path: Path
    images: int
    feature_dim: int
    with_ids: int
    kind: str


def scan_images(embedder: Embedder, samples: Sequence[Sample], what: str, progress: bool = True) -> None:
    """Every image decodes (all unreadable files named in one message), cached by size and date like a run's scan."""
    from ..checks import check_images_readable

    check_images_readable(embedder.cfg, samples, what=what, progress=progress)


def embed_images(images: str | os.PathLike | Sequence, out: str | os.PathLike, run: str | os.PathLike | None = None,
                 onnx: str | os.PathLike | None = None, device: str | None = None, progress: bool = True,
                 embedder: Embedder | None = None) -> EmbedResult:
    """Embed every image of ``images`` (:func:`collect_images`) with the model of ``run`` (or the ``onnx`` file, or
    a ready ``embedder``) and write the feature file ``out`` (``.parquet`` or ``.npz``). Checked before any image
    is embedded: the output name, the model, that images were found, that every one decodes."""
    out = _check_out(out)
    samples = image_samples(collect_images(images))
    embedder = embedder or load_embedder(run, onnx, device)
    scan_images(embedder, samples, what=f"images of --images {images}", progress=progress)
    feats = embedder(samples, progress=progress, desc="embed")
    table = FeatureTable.of(samples, feats, embedder.meta)
    write_features(out, table)
    return EmbedResult(out, len(table), feats.shape[1], int(table.has_ids.sum()), embedder.kind)
