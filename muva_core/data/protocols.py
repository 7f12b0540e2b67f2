"""Named domain-generalisation protocols: which datasets to train on, which one to test on.

* 12 single-source protocols over the paper's four datasets {MA, D, MS, C3} (Tables 1, 2):
  every ordered pair, named ``MA2D``, ``MA2MS``, ``MA2C3``, ``D2MA``, ...
* 4 multi-source leave-one-out protocols (Table 3): ``D+MS+C3->MA``, ``MA+MS+C3->D``,
  ``MA+D+C3->MS``, ``MA+D+MS->C3`` (train splits of the three sources combined).
* Synthetic-domain protocols over ``synth_A`` .. ``synth_D``: ``synth:A2B`` (all ordered
  pairs) and leave-one-out ``synth:B+C+D->A`` etc.

Names contain ``:`` and ``->``; :func:`protocol_slug` gives a folder-safe form
(``synth:A2B`` -> ``synth_A2B``, ``D+MS+C3->MA`` -> ``D+MS+C3_to_MA``) which
:func:`get_protocol` also accepts.

Any other ``SOURCE+SOURCE->TARGET`` whose parts are dataset names or dataset files
(:mod:`muva_core.data.declared`) is a protocol too, built when named:
``configs/datasets/mine.yaml->market1501`` trains on a dataset declared in YAML and tests on
Market-1501 (its name is the datasets' names, ``mine->market1501``). :func:`compose_protocol`
writes such a name from the ``sources`` / ``target`` keys of a configuration.
"""
from __future__ import annotations

import difflib
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from muva_core.data.datasets import ReIDDataset, SourceInfo, canonical_name, combine_train, load_dataset
from muva_core.data.declared import dataset_name, declared_spec, is_dataset_file, resolve_dataset_file
from muva_core.data.samples import DatasetError, Sample

__all__ = [
    "DATASET_CODES",
    "SYNTH_LETTERS",
    "Protocol",
    "ProtocolData",
    "register_protocol",
    "get_protocol",
    "list_protocols",
    "protocol_slug",
    "build_protocol_data",
    "compose_protocol",
    "dataset_root",
    "load_protocol_dataset",
    "protocol_datasets",
    "target_data",
]

DATASET_CODES: dict[str, str] = {
    "MA": "market1501",
    "D": "dukemtmcreid",
    "MS": "msmt17",
    "C3": "cuhk03_np",
}
"""The paper's short dataset codes -> canonical dataset names (C3 = CUHK03-NP detected)."""

SYNTH_LETTERS: tuple[str, ...] = ("A", "B", "C", "D")

KINDS = ("single", "multi")


@dataclass(frozen=True)
class Protocol:
    """A train/test protocol: train on ``sources`` (canonical dataset names), test on ``target``."""

    name: str
    sources: tuple[str, ...]
    target: str
    synthetic: bool = False
    description: str = ""

    @property
    def kind(self) -> str:
        """``"single"`` (one source) or ``"multi"`` (several sources combined)."""
        return "single" if len(self.sources) == 1 else "multi"

    @property
    def slug(self) -> str:
        return protocol_slug(self.name)


_PROTOCOLS: dict[str, Protocol] = {}


def protocol_slug(name: str) -> str:
    """A folder-safe form of a protocol name: ``:`` -> ``_``, ``->`` -> ``_to_``, spaces removed."""
    return name.replace(" ", "").replace("->", "_to_").replace(":", "_").replace("/", "_")


def register_protocol(name: str, sources: Sequence[str], target: str, *, synthetic: bool = False,
                      description: str = "") -> Protocol:
    """Register a protocol; ``sources`` / ``target`` may be dataset aliases (stored canonical)."""
    srcs = tuple(canonical_name(s) for s in sources)
    tgt = canonical_name(target)
    _check_roles(name, srcs, tgt)
    slugs = {p.slug: p.name for p in _PROTOCOLS.values()}
    if name in _PROTOCOLS or protocol_slug(name) in slugs:
        raise ValueError(f"protocol {name!r} (slug {protocol_slug(name)!r}) is already registered")
    proto = Protocol(name=name, sources=srcs, target=tgt, synthetic=synthetic, description=description)
    _PROTOCOLS[name] = proto
    return proto


def _register_builtin() -> None:
    codes = list(DATASET_CODES)
    for a, b in itertools.permutations(codes, 2):
        register_protocol(f"{a}2{b}", [DATASET_CODES[a]], DATASET_CODES[b],
                          description=f"single-source: train {a}, test {b} (paper Tables 1-2)")
    for tgt in codes:
        srcs = [c for c in codes if c != tgt]
        register_protocol("+".join(srcs) + "->" + tgt, [DATASET_CODES[c] for c in srcs], DATASET_CODES[tgt],
                          description=f"multi-source leave-one-out: train {'+'.join(srcs)}, test {tgt} (paper Table 3)")
    for a, b in itertools.permutations(SYNTH_LETTERS, 2):
        register_protocol(f"synth:{a}2{b}", [f"synth_{a}"], f"synth_{b}", synthetic=True,
                          description=f"synthetic single-source: train synth_{a}, test synth_{b}")
    for tgt in SYNTH_LETTERS:
        srcs = [c for c in SYNTH_LETTERS if c != tgt]
        register_protocol(f"synth:{'+'.join(srcs)}->{tgt}", [f"synth_{c}" for c in srcs], f"synth_{tgt}",
                          synthetic=True, description=f"synthetic multi-source leave-one-out: test synth_{tgt}")


def _check_roles(name: str, srcs: Sequence[str], tgt: str) -> None:
    if not srcs:
        raise ValueError(f"protocol {name!r} has no source dataset")
    if tgt in srcs:
        raise ValueError(f"protocol {name!r}: target {tgt!r} is also a source")
    if len(set(srcs)) != len(srcs):
        raise ValueError(f"protocol {name!r}: repeated source in {tuple(srcs)}")


def protocol_datasets(name: str) -> tuple[list[str], str]:
    """``(sources, target)`` of a protocol as spelled: the canonical dataset names of a registered protocol, the
    parts of a ``SOURCE+SOURCE->TARGET`` name (dataset names or files) otherwise."""
    if "->" in str(name) and _registered(str(name)) is None:
        head, _, tail = str(name).rpartition("->")
        return [part.strip() for part in head.split("+")], tail.strip()
    proto = get_protocol(name)
    return list(proto.sources), proto.target


def _portable_dataset(value: str) -> str:
    """A dataset as a configuration stores it: a name as given, a file relative to the project root when inside it."""
    if not is_dataset_file(value):
        return str(value).strip()
    from muva_core.paths import portable

    return portable(resolve_dataset_file(value))


def compose_protocol(sources: Sequence[str], target: str) -> str:
    """The protocol name ``SOURCE+SOURCE->TARGET`` of the ``sources`` / ``target`` keys (dataset names or files;
    files stored relative to the project root), checked: it must name known datasets and files."""
    name = "+".join(_portable_dataset(s) for s in sources) + "->" + _portable_dataset(target)
    get_protocol(name)
    return name


def _registered(name: str) -> Protocol | None:
    if name in _PROTOCOLS:
        return _PROTOCOLS[name]
    key = protocol_slug(str(name)).lower()
    for p in _PROTOCOLS.values():
        if p.slug.lower() == key:
            return p
    return None


def _composed(name: str) -> Protocol:
    """The protocol of a ``SOURCE+SOURCE->TARGET`` name (dataset names, aliases or dataset files)."""
    head, _, tail = name.rpartition("->")
    parts = [p.strip() for p in head.split("+")] + [tail.strip()]
    if any(not p for p in parts):
        raise ValueError(f"protocol {name!r}: expected SOURCE+SOURCE->TARGET with a dataset name or a dataset "
                         "file (.yaml) at each place")
    names, files = [], {}
    for part in parts:
        names.append(dataset_name(part))
        if is_dataset_file(part):
            files.setdefault(names[-1], set()).add(str(resolve_dataset_file(part)))
    clash = {n: sorted(f) for n, f in files.items() if len(f) > 1}
    if clash:
        raise ValueError(f"protocol {name!r}: several dataset files declare the same name: "
                         + "; ".join(f"{n!r} in {', '.join(f)}" for n, f in clash.items()))
    srcs, tgt = tuple(names[:-1]), names[-1]
    canonical = "+".join(srcs) + "->" + tgt
    _check_roles(canonical, srcs, tgt)
    files = [str(declared_spec(n).file) for n in names if declared_spec(n) is not None]
    return Protocol(name=canonical, sources=srcs, target=tgt, synthetic=any(n.startswith("synth_") for n in names),
                    description="composed from its datasets" + (f" (declared in {', '.join(files)})" if files else ""))


def get_protocol(name: str) -> Protocol:
    """The protocol registered as ``name`` (or with that slug, or case-insensitively equal), or the protocol of a
    ``SOURCE+SOURCE->TARGET`` name whose parts are dataset names or dataset files."""
    found = _registered(name)
    if found is not None:
        return found
    reason = ""
    if "->" in str(name):
        try:
            return _composed(str(name))
        except DatasetError:
            raise                       # a dataset file that cannot be used: its own message names it
        except ValueError as err:
            reason = f" (nor a protocol of datasets: {str(err).splitlines()[0]})"
    # match against names and slugs (case-insensitively), but suggest and list each protocol once, by its name
    forms: dict[str, str] = {}
    for p in _PROTOCOLS.values():
        forms.setdefault(p.name.lower(), p.name)
        forms.setdefault(p.slug.lower(), p.name)
    close = difflib.get_close_matches(str(name).lower(), list(forms), n=1, cutoff=0.5)
    hint = f"; did you mean {forms[close[0]]!r}?" if close else ""
    real = [n for n, p in _PROTOCOLS.items() if not p.synthetic]
    synth = [n for n, p in _PROTOCOLS.items() if p.synthetic]
    raise ValueError(
        f"unknown protocol {name!r}{hint}{reason}\n"
        f"protocols: {', '.join(real)}\n"
        f"synthetic: {', '.join(synth)}\n"
        "(folder-safe forms such as synth_A2B or D+MS+C3_to_MA are accepted too; "
        "`muva protocols` lists each one with its sources and target; SOURCE+SOURCE->TARGET of dataset names "
        "or dataset files names any other)"
    )


def list_protocols(kind: str | None = None) -> list[str]:
    """Registered protocol names, in registration order.

    ``kind``: None (all), ``"single"`` / ``"multi"`` (by number of sources), ``"real"`` /
    ``"synthetic"`` (by dataset family), or a combination like ``"synthetic-multi"``.
    """
    protos = list(_PROTOCOLS.values())
    if kind is None:
        return [p.name for p in protos]
    wanted = set(kind.replace("_", "-").lower().split("-"))
    allowed = {"single", "multi", "real", "synthetic", "synth"}
    if not wanted <= allowed:
        raise ValueError(f"unknown protocol kind {kind!r}; use single, multi, real, synthetic or e.g. 'synthetic-multi'")

    def ok(p: Protocol) -> bool:
        if "single" in wanted and p.kind != "single":
            return False
        if "multi" in wanted and p.kind != "multi":
            return False
        if ({"synthetic", "synth"} & wanted) and not p.synthetic:
            return False
        if "real" in wanted and p.synthetic:
            return False
        return True

    return [p.name for p in protos if ok(p)]


# --------------------------------------------------------------------------------------
# Data for a protocol
# --------------------------------------------------------------------------------------


@dataclass
class ProtocolData:
    """Everything a run needs from the data side of a protocol.

    ``train``: the (combined) source train samples with pid/camid offsets; ``query`` /
    ``gallery``: the target's test split (original pids); ``num_classes``: training identities;
    ``sources``: per source :class:`SourceInfo`; ``datasets``: the parsed datasets by name.
    """

    protocol: Protocol
    train: list[Sample]
    query: list[Sample]
    gallery: list[Sample]
    num_classes: int
    num_cams: int
    sources: dict[str, SourceInfo]
    datasets: dict[str, ReIDDataset] = field(repr=False, default_factory=dict)

    def summary(self):
        """A pandas table: one row per source (train) and two for the target (query, gallery)."""
        import pandas as pd

        rows = []
        for name, info in self.sources.items():
            rows.append(dict(role="source", dataset=name, split="train", images=info.num_images, ids=info.num_pids,
                             cameras=info.num_cams, pid_offset=info.pid_offset, cam_offset=info.cam_offset))
        for split, samples in (("query", self.query), ("gallery", self.gallery)):
            rows.append(dict(role="target", dataset=self.protocol.target, split=split, images=len(samples),
                             ids=len({s.pid for s in samples}), cameras=len({s.camid for s in samples}),
                             pid_offset=None, cam_offset=None))
        return pd.DataFrame(rows)


def _root_for(dataset: str, roots: Mapping[str, str | os.PathLike] | str | os.PathLike) -> Path:
    if isinstance(roots, (str, os.PathLike)):
        return Path(roots)
    by_name: dict[str, Path] = {}
    special: dict[str, Path] = {}
    for key, value in roots.items():
        if key in ("synth", "*"):
            special[key] = Path(value)
        else:
            by_name[canonical_name(key)] = Path(value)
    if dataset in by_name:
        return by_name[dataset]
    if dataset.startswith("synth_") and "synth" in special:
        return special["synth"]
    if "*" in special:
        return special["*"]
    raise ValueError(
        f"no root folder given for dataset {dataset!r}; roots has {sorted(roots)}"
        + (" (a 'synth' key serves every synthetic domain)" if dataset.startswith("synth_") else "")
    )


def dataset_root(dataset: str, roots: Mapping[str, str | os.PathLike] | str | os.PathLike) -> Path | None:
    """The root folder of a registered dataset in ``roots`` (see :func:`build_protocol_data`); None for a dataset
    declared in a file (its file names its root)."""
    return None if declared_spec(dataset) is not None else _root_for(dataset, roots)


def load_protocol_dataset(dataset: str, roots: Mapping[str, str | os.PathLike] | str | os.PathLike,
                          **load_kwargs) -> ReIDDataset:
    """Parse one dataset (a registered name) with its root from ``roots``."""
    return load_dataset(dataset, dataset_root(dataset, roots), **load_kwargs)


def _require_splits(ds: ReIDDataset, splits: Sequence[str], role: str) -> None:
    """A dataset that may lack splits (declared ones) must have those its role reads."""
    empty = [split for split in splits if not getattr(ds, split)]
    if empty:
        spec = declared_spec(ds.name)
        where = f"{ds.name} ({spec.file})" if spec is not None else ds.name
        raise DatasetError(f"{where} has no {' and no '.join(empty)} split, so it cannot be {role}")


def target_data(ds: ReIDDataset) -> ProtocolData:
    """The query / gallery of one dataset as a target-only :class:`ProtocolData` (no training side): what a trained
    run is evaluated on by ``muva eval --dataset``."""
    _require_splits(ds, ("query", "gallery"), "evaluated on")
    proto = Protocol(name=ds.name, sources=(), target=ds.name, synthetic=ds.name.startswith("synth_"),
                     description="query / gallery of one dataset")
    return ProtocolData(protocol=proto, train=[], query=list(ds.query), gallery=list(ds.gallery), num_classes=0,
                        num_cams=0, sources={}, datasets={ds.name: ds})


def load_declared(proto: Protocol, **load_kwargs) -> dict[str, ReIDDataset]:
    """Parse the datasets of ``proto`` declared in files and check each has the splits its role reads (cheap, and
    before any synthetic data is generated): ``{name: dataset}`` for :func:`build_protocol_data`'s ``parsed``."""
    out = {ds: load_dataset(ds, None, **load_kwargs) for ds in dict.fromkeys((*proto.sources, proto.target))
           if declared_spec(ds) is not None}
    for ds in proto.sources:
        if ds in out:
            _require_splits(out[ds], ("train",), f"a source of {proto.name}")
    if proto.target in out:
        _require_splits(out[proto.target], ("query", "gallery"), f"the target of {proto.name}")
    return out


def build_protocol_data(name: str | Protocol, roots: Mapping[str, str | os.PathLike] | str | os.PathLike,
                        parsed: Mapping[str, ReIDDataset] | None = None, **load_kwargs) -> ProtocolData:
    """Parse the datasets of protocol ``name`` and assemble its train / query / gallery.

    ``roots`` maps dataset names (or aliases) to root folders; key ``"synth"`` serves every
    synthetic domain, key ``"*"`` any dataset not named; a single path serves all datasets.
    ``load_kwargs`` go to :func:`load_dataset` (e.g. ``verify_images=True``); ``parsed`` datasets (by name) are
    used as they are.
    """
    proto = name if isinstance(name, Protocol) else get_protocol(name)
    # Check every root first, so a missing key fails before any slow parsing (a declared dataset has its own).
    names = (*proto.sources, proto.target)
    for ds in names:
        dataset_root(ds, roots)
    parsed = dict(parsed or {})
    datasets = {ds: parsed[ds] if ds in parsed else load_protocol_dataset(ds, roots, **load_kwargs) for ds in names}
    for ds in proto.sources:
        _require_splits(datasets[ds], ("train",), f"a source of {proto.name}")
    _require_splits(datasets[proto.target], ("query", "gallery"), f"the target of {proto.name}")
    train, info = combine_train([datasets[s] for s in proto.sources])
    target = datasets[proto.target]
    return ProtocolData(
        protocol=proto,
        train=train,
        query=list(target.query),
        gallery=list(target.gallery),
        num_classes=sum(i.num_pids for i in info.values()),
        num_cams=sum(i.num_cams for i in info.values()),
        sources=info,
        datasets=datasets,
    )


_register_builtin()


# ---- a configuration's protocol data (``cfg`` is a :class:`~muva_core.config.RunConfig`) ----------------------
def ensure_synthetic(cfg, progress: bool = True) -> Path:
    """Generate the synthetic domains of the protocol at ``cfg.data.synth_root`` unless they are there already
    (the other domains are added when a protocol needs them)."""
    from ..paths import resolve
    from .synthetic import generate_synthetic

    proto = get_protocol(cfg.data.protocol)
    domains = [d.removeprefix("synth_") for d in dict.fromkeys((*proto.sources, proto.target))
               if d.startswith("synth_")]
    return generate_synthetic(resolve(cfg.data.synth_root), seed=cfg.data.synth_seed, scale=cfg.data.synth_scale,
                              domains=domains, progress=progress)


def protocol_roots(cfg) -> dict[str, Path]:
    """Dataset roots for :func:`build_protocol_data`: the synthetic root, and ``data_root`` for every real dataset
    (both resolved against the project root)."""
    from ..paths import resolve

    return {"synth": resolve(cfg.data.synth_root), "*": resolve(cfg.data.data_root)}


def load_protocol(cfg, progress: bool = True) -> ProtocolData:
    """The protocol's data of a configuration; generates the synthetic set if needed."""
    proto = get_protocol(cfg.data.protocol)
    declared = load_declared(proto)      # datasets declared in files: checked before anything is generated
    if proto.synthetic:
        ensure_synthetic(cfg, progress=progress)
    return build_protocol_data(proto, protocol_roots(cfg), parsed=declared)


def load_dataset_for(cfg, dataset: str, progress: bool = True) -> ReIDDataset:
    """One dataset, by name or by its file (:mod:`muva_core.data.declared`), with the roots of ``cfg``: a declared
    dataset under its own root, a synthetic domain in the synthetic set (generated when missing), a real one under
    ``data_root`` (the folders tried named when it is not there)."""
    name = dataset_name(dataset)
    if name.startswith("synth_"):
        ensure_synthetic(cfg, progress=progress)
    return load_protocol_dataset(name, protocol_roots(cfg))


def source_datasets(data: ProtocolData) -> list:
    """The parsed source datasets of a protocol (whose train splits get part pseudo-labels)."""
    return [data.datasets[name] for name in data.sources]
