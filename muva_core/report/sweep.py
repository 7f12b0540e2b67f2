"""``muva sweep``: the variants of one of the paper's ablation tables (5-12) on a protocol.

Each variant is a set of config overrides; each (variant, seed) is one resumable training run
(``muva_core.train.run.train_protocol``) in ``reports/<protocol>/sweep-runs/run-<config hash>/``
(the seed is part of the configuration). Finished runs are read back, not retrained, and a
configuration shared by several tables is trained once. The comparison table (mean and standard deviation
over seeds of mAP, Rank-1 and the predicted-mask IoU against ground-truth boxes, beside the
paper's numbers for MA->MS and MS->MA) is written as markdown and CSV.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..paths import portable, resolve
from ..config import RunConfig
from ..data.protocols import get_protocol, protocol_slug
from ..io import atomic_path
from .paper import ABLATIONS

VARIANTS: dict[int, dict[str, dict]] = {
    5: {code: {"granularity": code} for code in ABLATIONS[5]},
    6: {
        "vision-only, single-grained": {"vision_only": True, "granularity": "G"},
        "vision-language, single-grained": {"vision_only": False, "granularity": "G"},
        "vision-only, multi-grained": {"vision_only": True, "granularity": "G+H+U+L"},
        "vision-language, multi-grained": {"vision_only": False, "granularity": "G+H+U+L"},
    },
    7: {
        "PAP": {"part_agnostic_prompts": True},
        "DSP": {"domain_specific_prompts": True},
        "original": {},
    },
    8: {"stripe-like": {"mask_mode": "stripe"}, "AM-MSA": {"mask_mode": "predicted"}},
    9: {"w/o calibration": {"calibrate": False}, "w/ calibration": {"calibrate": True}},
    10: {
        "RMP w/o LN+RC": {"rmp_layernorm": False, "rmp_residual": False},
        "RMP w/ LN": {"rmp_layernorm": True, "rmp_residual": False},
        "RMP w/ RC": {"rmp_layernorm": False, "rmp_residual": True},
        "RMP w/ LN+RC": {"rmp_layernorm": True, "rmp_residual": True},
    },
    11: {"w/ RCRE": {"augment": "flip+crop+erase"}, "w/o RCRE": {"augment": "flip"}},
    12: {f"{h} head{'s' if h > 1 else ''}": {"rmp_heads": h} for h in (1, 2, 4, 8, 16)},
}
"""Per ablation table: variant name (the paper's row label) -> config overrides."""


def variant_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9+]+", "-", name).strip("-").lower()


def sweep_dir(cfg: RunConfig, table: int) -> Path:
    """``reports/<protocol>/sweep-table<N>`` (``sweep-table<N>-<recipe>`` under a recipe other than workbook)."""
    suffix = "" if cfg.recipe == "workbook" else f"-{cfg.recipe}"
    return resolve(cfg.reports_dir) / protocol_slug(get_protocol(cfg.data.protocol).name) / f"sweep-table{table}{suffix}"


def variant_config(cfg: RunConfig, table: int, variant: str, seed: int) -> RunConfig:
    """The run configuration of one (variant, seed); its folder is named by the configuration's hash, so a
    variant that several tables share (the full model is in Tables 5, 6, 8 and 9) is trained once."""
    from .runner import config_hash

    run = copy.deepcopy(cfg).update({**VARIANTS[table][variant], "seed": seed})
    slug = protocol_slug(get_protocol(cfg.data.protocol).name)
    run.run_dir = portable(resolve(cfg.reports_dir) / slug / "sweep-runs" / f"run-{config_hash(run)}")
    return run


def run_variant(cfg: RunConfig, table: int, variant: str, seed: int, progress: bool = True) -> dict:
    """One (variant, seed) run; returns its recorded ``metrics/train.json`` (training only when missing)."""
    from ..train.run import train_protocol

    run = variant_config(cfg, table, variant, seed)
    record = resolve(run.run_dir) / "metrics" / "train.json"
    if not record.is_file():
        train_protocol(run, progress=progress)
    return json.loads(record.read_text())


def run_sweep(cfg: RunConfig, table: int, seeds: Sequence[int] = (0,), variants: Sequence[str] | None = None,
              progress: bool = True) -> pd.DataFrame:
    """Every variant x seed of ``table``; writes ``table<N>.md`` / ``.csv`` and returns the summary frame."""
    if table not in VARIANTS:
        raise ValueError(f"--table: ablation tables are {sorted(VARIANTS)}, got {table}")
    names = list(variants or VARIANTS[table])
    unknown = [v for v in names if v not in VARIANTS[table]]
    if unknown:
        raise ValueError(f"table {table} has no variant(s) {unknown}; variants: {list(VARIANTS[table])}")
    rows = []
    for name in names:
        for seed in seeds:
            rec = run_variant(cfg, table, name, seed, progress)
            row = {"variant": name, "seed": seed, "mAP": rec["metrics"]["mAP"], "Rank-1": rec["metrics"]["Rank-1"],
                   "seconds": rec.get("seconds"), "run": variant_config(cfg, table, name, seed).run_dir}
            iou = rec.get("mask_iou_truth") or {}
            row["mask IoU"] = float(np.mean(list(iou.values()))) if iou else np.nan
            rows.append(row)
    per_run = pd.DataFrame(rows)
    summary = summarise(per_run, table)
    write_sweep(summary, per_run, sweep_dir(cfg, table), table, cfg.data.protocol, seeds)
    return summary


def summarise(per_run: pd.DataFrame, table: int) -> pd.DataFrame:
    """Mean / std over seeds per variant, with the paper's (mAP, Rank-1) for MA->MS and MS->MA."""
    g = per_run.groupby("variant", sort=False)
    out = pd.DataFrame({
        "mAP": g["mAP"].mean(), "mAP std": g["mAP"].std(ddof=1),
        "Rank-1": g["Rank-1"].mean(), "Rank-1 std": g["Rank-1"].std(ddof=1),
        "mask IoU": g["mask IoU"].mean(), "seeds": g["seed"].count(),
    })
    for proto in ("MA2MS", "MS2MA"):
        out[f"paper {proto} mAP"] = [ABLATIONS[table].get(v, {}).get(proto, (np.nan, np.nan))[0] for v in out.index]
        out[f"paper {proto} Rank-1"] = [ABLATIONS[table].get(v, {}).get(proto, (np.nan, np.nan))[1] for v in out.index]
    return out


def write_sweep(summary: pd.DataFrame, per_run: pd.DataFrame, folder: Path, table: int, protocol: str,
                seeds: Sequence[int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / f"table{table}.csv") as tmp:
        summary.to_csv(tmp)
    with atomic_path(folder / f"table{table}-runs.csv") as tmp:
        per_run.to_csv(tmp, index=False)
    seeds_txt = " ".join(str(s) for s in seeds)
    text = (f"# Table {table} on {protocol}\n\n"
            f"`muva sweep --table {table} --protocol '{protocol}' --seeds {seeds_txt}`; mean (std) over seeds; "
            "mask IoU = predicted part masks vs ground-truth part boxes on the target (synthetic only).\n\n"
            + summary.round(2).to_markdown() + "\n")
    with atomic_path(folder / f"table{table}.md") as tmp:
        tmp.write_text(text)
