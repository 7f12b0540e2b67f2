"""Comparison tables: this project's runs beside the paper's numbers."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..paths import resolve
from .index import SUMMARIES
from .paper import MAIN_RESULTS


def collect_runs(reports_dir: str | Path) -> pd.DataFrame:
    """One row per run folder under ``reports_dir`` that has a ``metrics.json`` with metrics."""
    rows = []
    for path in sorted(resolve(reports_dir).glob(SUMMARIES)):
        rec = json.loads(path.read_text())
        m = rec.get("metrics") or {}
        if "mAP" in m:  # `muva run` / `muva train` records, not `muva baseline` output
            rows.append({"protocol": rec.get("protocol"), "run": path.parent.name, "mAP": m.get("mAP"),
                         "Rank-1": m.get("Rank-1"), "seconds": rec.get("seconds")})
    return pd.DataFrame(rows, columns=["protocol", "run", "mAP", "Rank-1", "seconds"])


def paper_comparison(reports_dir: str | Path) -> pd.DataFrame:
    """The paper's Tables 1-3 MUVA rows, with the latest run of each protocol beside them (NaN where none)."""
    runs = collect_runs(reports_dir)
    latest = runs.groupby("protocol").tail(1).set_index("protocol") if len(runs) else pd.DataFrame()
    rows = []
    for protocol, (mAP, r1) in MAIN_RESULTS.items():
        ours = latest.loc[protocol] if protocol in latest.index else None
        rows.append({"protocol": protocol, "paper mAP": mAP, "paper Rank-1": r1,
                     "ours mAP": None if ours is None else ours["mAP"],
                     "ours Rank-1": None if ours is None else ours["Rank-1"],
                     "run": None if ours is None else ours["run"]})
    return pd.DataFrame(rows).set_index("protocol")


def format_table(frame: pd.DataFrame, title: str) -> str:
    """A titled plain-text table (two decimals), as the CLI prints it."""
    return f"\n{title}\n" + frame.round(2).to_string() + "\n"
