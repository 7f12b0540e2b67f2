"""``muva run``: execute the numbered notebooks of a protocol with papermill, into a run folder.

    reports/<protocol slug>/<run id>/
        config.yaml            the resolved configuration (single source of truth for the run)
        notebooks/NN_*.ipynb   the executed notebooks
        figures/               PNG + SVG of every figure
        metrics/<step>.json    what each notebook recorded
        metrics.json           the run's summary (mAP, Rank-1, ..., time per step)
        steps.json             per step: the hash of its inputs and its wall time (for skipping)

The run id defaults to a hash of the resolved configuration, so running the same configuration
again reuses the folder and skips every step whose notebook and parameters are unchanged;
grounding tables and masks are cached per dataset under ``cache_dir`` and shared by all runs.
A failing notebook stops the run with its cell and error; earlier outputs stay.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..config import ConfigError, RunConfig
from ..data.protocols import get_protocol, protocol_slug
from ..io import write_json

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = ROOT / "notebooks"
CONFIG_DIR = ROOT / "configs"
PIPELINE = ("01_grounding", "02_calibration", "03_mask_voting", "04_stage1_prompts", "05_stage2_reid", "06_evaluate",
            "07_figures")


class StepFailed(RuntimeError):
    """A notebook raised; the message names the notebook, the cell and the error."""


def protocol_config_path(protocol: str) -> Path:
    return CONFIG_DIR / f"{protocol_slug(get_protocol(protocol).name)}.yaml"


def resolve_config(protocol: str | None = None, config: str | Path | None = None,
                   overrides: dict | None = None) -> RunConfig:
    """The config file given, else ``configs/<protocol slug>.yaml`` when it exists, else the defaults;
    then the overrides. The protocol is checked against the registry."""
    overrides = dict(overrides or {})
    if protocol:
        overrides["protocol"] = protocol
    path = Path(config) if config else (protocol_config_path(protocol) if protocol else None)
    if path is not None and path.is_file():
        cfg = RunConfig.from_yaml(path, overrides)
    elif config:
        raise ConfigError(f"{config}: config file not found")
    else:
        cfg = RunConfig().update(overrides)
    get_protocol(cfg.data.protocol)  # unknown protocol: fail before any work
    return cfg


def config_hash(cfg: RunConfig) -> str:
    flat = {k: v for k, v in cfg.to_flat().items() if k not in ("run_dir",)}
    return hashlib.sha1(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _notebook_parameters(path: Path) -> list[str]:
    import papermill as pm

    return list(pm.inspect_notebook(str(path)))


@dataclass
class StepResult:
    name: str
    status: str          # ran | skipped
    seconds: float


def run_notebooks(cfg: RunConfig, steps: Sequence[str] = PIPELINE, run_id: str | None = None,
                  force: bool = False, progress: bool = True, kernel_name: str = "python3",
                  command: str | None = None) -> Path:
    """Execute ``steps`` in order into the run folder; returns the folder.

    ``command`` is the command line that reproduces the run (recorded in ``metrics.json``)."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    slug = protocol_slug(get_protocol(cfg.data.protocol).name)
    run_id = run_id or f"run-{config_hash(cfg)}"
    folder = Path(cfg.reports_dir) / slug / run_id
    cfg.run_dir = str(folder)
    (folder / "notebooks").mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(folder / "config.yaml")
    state_path = folder / "steps.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    flat = cfg.to_flat()
    results = []
    for name in steps:
        source = NOTEBOOK_DIR / f"{name}.ipynb"
        if not source.is_file():
            raise FileNotFoundError(f"{source}: no such notebook (steps are {', '.join(PIPELINE)} ...)")
        # every config key goes in (a notebook's parameters cell names the keys it shows; the steps it calls
        # may read any other key, e.g. rmp_layernorm in stage 2): the whole configuration reaches the kernel
        declared = _notebook_parameters(source)
        unknown = [k for k in declared if k not in flat]
        if unknown:
            raise ConfigError(f"{source}: parameters that are not config keys: {unknown}")
        params = dict(flat)
        digest = hashlib.sha1(source.read_bytes() + json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()
        out = folder / "notebooks" / f"{name}.ipynb"
        if not force and state.get(name, {}).get("hash") == digest and out.is_file():
            results.append(StepResult(name, "skipped", 0.0))
            if progress:
                print(f"[{name}] unchanged since the last run: skipped")
            continue
        if progress:
            print(f"[{name}] running ...", flush=True)
        t0 = time.perf_counter()
        logging.getLogger("papermill").setLevel(logging.ERROR)  # not "unknown parameter" for every key
        try:
            pm.execute_notebook(str(source), str(out), parameters=params, progress_bar=False, cwd=str(Path.cwd()),
                                kernel_name=kernel_name)
        except PapermillExecutionError as err:
            state.pop(name, None)
            write_json(state_path, state)
            raise StepFailed(f"{name} failed in cell {err.exec_count}: {err.ename}: {err.evalue} "
                             f"(executed notebook with the traceback: {out})") from None
        seconds = time.perf_counter() - t0
        state[name] = {"hash": digest, "seconds": round(seconds, 2)}
        write_json(state_path, state)
        results.append(StepResult(name, "ran", seconds))
        if progress:
            print(f"[{name}] done in {seconds:.1f} s", flush=True)
    summary = summarise_run(folder, cfg, state)
    summary["command"] = command or f"muva run --protocol '{cfg.data.protocol}'"
    write_json(folder / "metrics.json", summary)
    write_reports_index(Path(cfg.reports_dir))
    return folder


def summarise_run(folder: Path, cfg: RunConfig, state: dict) -> dict:
    """The run's headline numbers from the notebooks' records."""
    metrics_dir = folder / "metrics"
    summary: dict = {"protocol": cfg.data.protocol, "run_dir": str(folder),
                     "seconds": round(sum(s.get("seconds", 0) for s in state.values()), 2),
                     "steps": {k: v.get("seconds") for k, v in state.items()}}
    for step in ("06_evaluate", "05_stage2", "train"):
        path = metrics_dir / f"{step}.json"
        if path.is_file():
            rec = json.loads(path.read_text())
            summary["metrics"] = rec.get("metrics")
            summary["mask_iou_truth"] = rec.get("mask_iou_truth", {})
            break
    cal = metrics_dir / "02_calibration.json"
    if cal.is_file():
        summary["calibration_iou"] = json.loads(cal.read_text()).get("iou")
    return summary


def write_reports_index(reports_dir: Path) -> Path:
    """``reports/README.md``: one row per run (protocol, config, mAP, Rank-1, time, notebooks)."""
    rows = []
    for path in sorted(reports_dir.glob("*/*/metrics.json")):
        rec = json.loads(path.read_text())
        m = rec.get("metrics") or {}
        folder = path.parent
        if "mAP" not in m and "steps" not in rec:
            continue  # not a `muva run` folder (e.g. `muva baseline` output)
        rel = folder.relative_to(reports_dir)
        cfg = RunConfig.from_yaml(folder / "config.yaml") if (folder / "config.yaml").is_file() else None
        model = f"{cfg.model.backbone}, {cfg.model.granularity}, {cfg.model.mask_mode}" if cfg else "?"
        nbs = " ".join(f"[{p.stem[:2]}]({rel}/notebooks/{p.name})" for p in sorted((folder / "notebooks").glob("*.ipynb")))
        fmt = lambda v: f"{v:.1f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
        rows.append(f"| {rec.get('protocol')} | [{rel.name}]({rel}/config.yaml) | {model} | {fmt(m.get('mAP'))} | "
                    f"{fmt(m.get('Rank-1'))} | {fmt(rec.get('seconds'))} | {nbs} |")
    text = ["# Runs", "", "Generated by `muva run` (muva_core/report/runner.py); one row per run folder.", "",
            "| protocol | run (config) | model | mAP | Rank-1 | time (s) | notebooks |",
            "| --- | --- | --- | --- | --- | --- | --- |", *rows, ""]
    out = reports_dir / "README.md"
    reports_dir.mkdir(parents=True, exist_ok=True)
    from ..io import atomic_path

    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(text))
    return out


def parse_steps(text: str | None) -> list[str]:
    """``"01-03"`` / ``"01,04"`` / None (all) to notebook names."""
    if not text:
        return list(PIPELINE)
    available = sorted(p.stem for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    chosen: list[str] = []
    for part in text.split(","):
        m = re.fullmatch(r"(\d\d)(?:-(\d\d))?", part.strip())
        if not m:
            raise ValueError(f"--steps: expected NN, NN-MM or a comma list, got {part!r}")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        chosen += [n for n in available if lo <= int(n[:2]) <= hi and n not in chosen]
    return chosen


RESULTS_START, RESULTS_END = "<!-- results:start -->", "<!-- results:end -->"


def results_table(reports_dir: Path) -> str:
    """The README's results table: one row per run folder with metrics, and the command that made it."""
    lines = ["| protocol | model | mAP | Rank-1 | Rank-5 | mINP | mask IoU vs truth (head / upper / legs) | time | command |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for path in sorted(Path(reports_dir).glob("*/*/metrics.json")):
        rec = json.loads(path.read_text())
        m = rec.get("metrics")
        folder = path.parent
        if not m or "mAP" not in m or not (folder / "config.yaml").is_file():
            continue  # not a `muva run` folder (e.g. `muva baseline` output)
        cfg = RunConfig.from_yaml(folder / "config.yaml")
        init = "random init" if cfg.model.pretrained in ("none", "") and not cfg.model.checkpoint_path else (
            cfg.model.checkpoint_path or cfg.model.pretrained)
        model = f"{cfg.model.backbone} CLIP ({init}), {cfg.model.granularity}, {cfg.model.mask_mode} masks"
        iou = rec.get("mask_iou_truth") or {}
        iou_txt = " / ".join(f"{iou[p]:.2f}" for p in ("head", "upper", "legs") if p in iou) or "-"
        lines.append(f"| {rec['protocol']} | {model} | {m['mAP']:.1f} | {m['Rank-1']:.1f} | {m['Rank-5']:.1f} | "
                     f"{m['mINP']:.1f} | {iou_txt} | {rec.get('seconds', 0):.0f} s | `{rec.get('command', '')}` |")
    return "\n".join(lines)


def update_readme_results(readme: Path, reports_dir: Path) -> bool:
    """Rewrite the README block between the results markers from ``reports_dir``; True when it changed."""
    text = readme.read_text()
    if RESULTS_START not in text or RESULTS_END not in text:
        raise ValueError(f"{readme}: no {RESULTS_START} ... {RESULTS_END} block to fill")
    head, rest = text.split(RESULTS_START, 1)
    _, tail = rest.split(RESULTS_END, 1)
    new = f"{head}{RESULTS_START}\n{results_table(reports_dir)}\n{RESULTS_END}{tail}"
    if new != text:
        readme.write_text(new)
    return new != text
