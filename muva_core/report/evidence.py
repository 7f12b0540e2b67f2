"""The evidence page: the paper's ablation claims judged on the synthetic benchmark, and the page that shows them.

:mod:`muva_core.experiments.evidence` plans and trains the study's runs; this module judges each claim (difference
of means against twice its standard error, Welch) and writes ``reports/evidence.md``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ..io import atomic_path
from .paper import ABLATIONS


@dataclass(frozen=True)
class Claim:
    table: int
    text: str
    better: str
    worse: str


CLAIMS: tuple[Claim, ...] = (
    Claim(5, "all granularities (G+H+U+L) beat the global token alone (G)", "G+H+U+L", "G"),
    Claim(5, "adding the head helps (G+H vs G)", "G+H", "G"),
    Claim(5, "adding the upper body helps (G+U vs G)", "G+U", "G"),
    Claim(5, "adding the legs helps (G+L vs G)", "G+L", "G"),
    Claim(6, "language helps the multi-grained model", "vision-language, multi-grained", "vision-only, multi-grained"),
    Claim(6, "language helps the single-grained model", "vision-language, single-grained", "vision-only, single-grained"),
    Claim(6, "multi-grained beats single-grained with language", "vision-language, multi-grained",
          "vision-language, single-grained"),
    Claim(8, "predicted part masks (AM-MSA) beat fixed stripes", "AM-MSA", "stripe-like"),
    Claim(9, "calibrated pseudo labels beat raw ones", "w/ calibration", "w/o calibration"),
)


def _welch(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Difference of means and its standard error (NaN with fewer than two seeds a side)."""
    diff = float(np.mean(a) - np.mean(b))
    if len(a) < 2 or len(b) < 2:
        return diff, math.nan
    return diff, float(math.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b)))


def verdict(diff: float, se: float) -> str:
    if math.isnan(se):
        return "one seed: no verdict"
    if se == 0:
        return "holds" if diff > 0 else ("reversed" if diff < 0 else "no difference")
    if diff > 2 * se:
        return "holds"
    if diff < -2 * se:
        return "reversed"
    return "within seed noise"


def evaluate_claims(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (claim, protocol, metric) from the per-run table (columns table, protocol, variant, seed, mAP, Rank-1)."""
    rows = []
    runs = runs if "recipe" in runs.columns else runs.assign(recipe="workbook")
    for claim in CLAIMS:
        paper = ABLATIONS[claim.table]
        for (recipe, protocol), group in runs[runs["table"] == claim.table].groupby(["recipe", "protocol"], sort=False):
            for metric in ("mAP", "Rank-1"):
                a = group.loc[group["variant"] == claim.better, metric].to_numpy(float)
                b = group.loc[group["variant"] == claim.worse, metric].to_numpy(float)
                if not len(a) or not len(b):
                    continue
                diff, se = _welch(a, b)
                k = 0 if metric == "mAP" else 1
                rows.append({
                    "table": claim.table, "claim": claim.text, "recipe": recipe, "protocol": protocol, "metric": metric,
                    "paper MA2MS": round(paper[claim.better]["MA2MS"][k] - paper[claim.worse]["MA2MS"][k], 1),
                    "paper MS2MA": round(paper[claim.better]["MS2MA"][k] - paper[claim.worse]["MS2MA"][k], 1),
                    "better": f"{a.mean():.1f} ± {a.std(ddof=1) if len(a) > 1 else 0:.1f}",
                    "worse": f"{b.mean():.1f} ± {b.std(ddof=1) if len(b) > 1 else 0:.1f}",
                    "difference": round(diff, 2), "std error": round(se, 2), "verdict": verdict(diff, se),
                })
    return pd.DataFrame(rows)


def read_notes(page: Path) -> str | None:
    """``<page stem>-notes.md`` beside the page: a reading of the results written after looking at the data
    (kept by hand, included verbatim)."""
    notes = page.with_name(f"{page.stem}-notes.md")
    return notes.read_text() if notes.is_file() else None


def _compute_line(runs: pd.DataFrame) -> str:
    """How long the runs took: their training seconds (the per-run table's ``seconds``) summed, each run folder
    once (the full model is a row of several tables)."""
    unique = runs.drop_duplicates("run") if "run" in runs.columns else runs
    seconds = pd.to_numeric(unique.get("seconds", pd.Series(dtype=float)), errors="coerce")
    if not seconds.notna().any():
        return "Training time: not recorded."
    line = (f"Training time: {seconds.sum() / 3600:.1f} hours of one process for the {int(seconds.notna().sum())} "
            f"runs (`seconds` in the per-run table: each run's epochs of both stages, summed from its histories, "
            f"so a run resumed across sessions counts every part; {seconds.mean() / 60:.0f} minutes a run on "
            f"average).")
    return line + _precision_clause(unique) + _start_clause(unique)


def _counted_clause(runs: pd.DataFrame, column: str, lead: str, item: str) -> str:
    """`` <lead>: <n> <item>, ..., <m> not recorded.`` counting the per-run table's ``column`` values (most
    frequent first), ``""`` when no run records one; ``item`` formats a value (``{v}``)."""
    values = runs[column].fillna("").astype(str) if column in runs.columns else pd.Series(dtype=str)
    counts = values[values != ""].value_counts()
    if counts.empty:
        return ""
    parts = ", ".join(f"{n} " + item.format(v=v) for v, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    unknown = int((values == "").sum())
    return f" {lead}: {parts}" + (f", {unknown} not recorded" if unknown else "") + "."


def _precision_clause(runs: pd.DataFrame) -> str:
    """Which arithmetic the runs' last processes used (the CPU decides: bfloat16 autocast where it computes
    bfloat16 natively, float32 elsewhere), when the per-run table says."""
    return _counted_clause(runs, "precision", "Precision of each run's last process (`precision` in the per-run "
                           "table; it follows the CPU: bfloat16 autocast where the CPU computes bfloat16 natively, "
                           "else float32)", "in {v}")


def _start_clause(runs: pd.DataFrame) -> str:
    """Which builds of the CLIP file the runs started from (``start`` in the per-run table: the first digits of
    the SHA-256 of the file's weights), when the per-run table says: a CLIP re-made on another machine keeps its
    name."""
    return _counted_clause(runs, "start", "The CLIP each run started from, by the SHA-256 of its weights (`start` "
                           "in the per-run table)", "from `{v}`")


def write_evidence(path: Path, claims: pd.DataFrame, runs: pd.DataFrame, scale: str, seeds, protocols,
                   settings: dict, recipes: Mapping[str, Sequence[int]],
                   diagnostics: dict[str, pd.DataFrame] | None = None, notes: str | None = None,
                   clip: str | None = None, user: Mapping[str, object] | None = None) -> None:
    """The page at ``path``: ``settings`` = the scale's ``overrides`` (and ``multi_source``, ``variants``),
    ``recipes`` = the tables run under each recipe, ``notes`` = the hand-written reading (:func:`read_notes`),
    ``clip`` = the command that made the CLIP the runs start from when the scale names one, ``user`` = the
    command's own ``-p`` settings (on top of the scale's; a ``checkpoint_path`` among them is where the runs
    start)."""
    user = dict(user or {})
    runs = runs if "recipe" in runs.columns else runs.assign(recipe="workbook")
    metrics = ["mAP", "Rank-1", "mask IoU"] + (["held-out mAP"] if "held-out mAP" in runs.columns else [])
    summary = (runs.groupby(["recipe", "protocol", "table", "variant"], sort=False)[metrics]
               .agg(["mean", "std"]).round(2))
    summary.columns = [f"{a} {b}" for a, b in summary.columns]
    held = claims[claims["metric"] == "mAP"]["verdict"].value_counts().to_dict() if len(claims) else {}
    text = [
        f"# Evidence: the paper's ablation directions on the synthetic DG benchmark ({scale} scale)",
        "",
        f"Generated by `muva evidence --scale {scale}` (muva_core/report/evidence.py): protocols "
        f"{', '.join(protocols)}; seeds {', '.join(map(str, seeds))}. Every number below is the mean over seeds of "
        "runs whose folders are listed in the per-run table at the end (`reports/<protocol>/sweep-runs/`; each "
        "keeps `config.yaml`, the loss histories and `metrics/train.json`).",
        "",
        f"Settings on top of `configs/<protocol>.yaml`: `{json.dumps(settings['overrides'])}`"
        + (f"; multi-source protocols also `{json.dumps(settings['multi_source'])}`"
           if "multi_source" in settings else "")
        + (f"; the command's own settings `{json.dumps(user)}`" if user else "")
        + (f"; starting from the checkpoint `{user['checkpoint_path']}`" if user.get("checkpoint_path") else
           f"; starting from the language-pretrained CLIP of `{clip}` (made first when missing)" if clip else
           "; `pretrained: pretrain-clip` = starting from the language-pretrained CLIP of `muva pretrain-clip --out "
           "data/clip --backbone small --seed 0` (made first when missing)"
           if user.get("pretrained", settings["overrides"].get("pretrained")) == "pretrain-clip" else
           "; starting from random weights (`pretrained: none`)")
        + (f"; trained variants cut to `{json.dumps(settings['variants'])}` (per table)" if "variants" in settings
           else "") + ".",
        "",
        "A direction *holds* when the difference of the two variants' means exceeds twice its standard error "
        "(Welch), *reversed* when it is below minus twice, else it is *within seed noise*. The paper columns give "
        "the paper's difference (better minus worse, in points) on MA->MS and MS->MA.",
        "",
        "Training recipes (`recipe:`, docs/recipes.md): "
        + "; ".join(f"`{r}` for Tables {', '.join(map(str, recipes[r]))}" for r in recipes)
        + ". Each claim is judged per recipe and protocol.",
        "",
        f"mAP verdicts: {', '.join(f'{k} {v}' for k, v in held.items()) or 'none'}.",
        "",
        _compute_line(runs),
        "",
        "## Claims",
        "",
        claims.to_markdown(index=False) if len(claims) else "(no claims evaluated)",
        "",
        "## Variants (mean, std over seeds; mask IoU = predicted masks vs ground-truth part boxes on the target; "
        "held-out mAP = the source domains' own query/gallery splits, where the runs evaluated them)",
        "",
        summary.to_markdown(),
        "",
    ]
    if notes:
        text += [f"## Reading the results (by hand, from `{path.stem}-notes.md`)", "", notes.strip(), ""]
    if diagnostics:
        text += ["## Diagnostics", ""]
        for title, table in diagnostics.items():
            plain = isinstance(table.index, pd.RangeIndex)
            text += [f"### {title}", "", table.to_markdown(index=not plain) if len(table) else "(not available)", ""]
    text += [
        "## Runs",
        "",
        runs.round(2).to_markdown(index=False),
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(text))
