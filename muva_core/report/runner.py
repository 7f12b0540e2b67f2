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
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

from ..config import ConfigError, RunConfig, protocol_config_path, resolve_config  # noqa: F401 (re-exported)
from ..io import write_json
from ..paths import config_hash, notebook_dir, project_root, resolve  # noqa: F401 (config_hash re-exported)

PIPELINE = ("01_grounding", "02_calibration", "03_mask_voting", "04_stage1_prompts", "05_stage2_reid", "06_evaluate",
            "07_figures")


class StepFailed(RuntimeError):
    """A notebook raised; the message names the notebook, the cell and the error."""


def _notebook_parameters(path: Path) -> list[str]:
    import papermill as pm

    return list(pm.inspect_notebook(str(path)))


KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=ERROR"]
"""The kernel's own log stays quiet (no "Kernel is running over TCP without encryption" per notebook);
errors in a notebook still reach the runner as execution errors."""


def run_notebooks(cfg: RunConfig, steps: Sequence[str] = PIPELINE, run_id: str | None = None,
                  force: bool = False, progress: bool = True, kernel_name: str = "python3",
                  command: str | None = None, wait: bool = False) -> Path:
    """Execute ``steps`` in order into the run folder; returns the folder.

    Before any kernel starts: the steps exist, the configuration is checked, the run folder holds the same
    configuration (or is refused, see :func:`muva_core.paths.claim_run_folder`), the datasets are there
    and the batches can be formed; a failed check leaves no folder behind. Before a paper protocol the doctor's
    short form is printed (:func:`muva_core.report.doctor.short_report`). Each notebook runs with its
    kernel in ``notebooks/``, as JupyterLab starts it; its progress lines (epochs, resumes) are printed
    here while it runs. ``command`` is the command line that reproduces the run (in ``metrics.json``).
    The run folder is locked while the notebooks run (their kernels inherit the lock, see
    :mod:`muva_core.locks`): another process's live lock raises :class:`~muva_core.locks.LockHeld` naming its
    holder, or is waited for with ``wait``."""
    from ..locks import hold, shared_data
    from ..paths import check_run_folder, run_folder
    from ..pipeline import preflight

    if not steps:
        raise ValueError("no notebooks to run (--steps matched none)")
    sources = {name: notebook_dir() / f"{name}.ipynb" for name in steps}
    for name, source in sources.items():
        if not source.is_file():
            raise FileNotFoundError(f"{source}: no such notebook (steps are {', '.join(PIPELINE)}, "
                                    "08_part_mask_explorer, 09_retrieval_explorer)")
        # every config key goes in (a notebook's parameters cell names the keys it shows; the steps it calls
        # may read any other key, e.g. rmp_layernorm in stage 2): the whole configuration reaches the kernel
        unknown = [k for k in _notebook_parameters(source) if k not in cfg.to_flat()]
        if unknown:
            raise ConfigError(f"{source}: parameters that are not config keys: {unknown}")
    folder = run_folder(cfg, run_id)
    check_run_folder(cfg, folder)
    with shared_data(cfg):
        data = preflight(cfg, progress=progress)
    if progress and not data.protocol.synthetic:  # a paper protocol: what decides whether it can reproduce the paper
        from .doctor import short_report

        print(short_report(cfg, data), flush=True)
    with hold(folder, wait=wait):
        return _execute(cfg, folder, sources, force, progress, kernel_name, command)


def _execute(cfg: RunConfig, folder: Path, sources: dict[str, Path], force: bool, progress: bool, kernel_name: str,
             command: str | None) -> Path:
    """The notebooks of :func:`run_notebooks`, run in the locked, checked run folder."""
    import os

    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    from ..paths import claim_run_folder
    from ..progress import ENV, ProgressTail

    fresh = not cfg.train.resume
    claim_run_folder(cfg, folder)
    if fresh:  # started afresh once, here; the notebooks then continue in the fresh folder
        cfg.train.resume = True
    (folder / "notebooks").mkdir(exist_ok=True)
    state_path = folder / "steps.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    params = cfg.to_flat()
    log = folder / "progress.log"
    logging.getLogger("papermill").setLevel(logging.ERROR)  # not "unknown parameter" for every key
    for name, source in sources.items():
        digest = hashlib.sha1(source.read_bytes() + json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()
        out = folder / "notebooks" / f"{name}.ipynb"
        if not force and state.get(name, {}).get("hash") == digest and out.is_file():
            if progress:
                print(f"[{name}] unchanged since the last run: skipped")
            continue
        if progress:
            print(f"[{name}] running ...", flush=True)
        t0 = time.perf_counter()
        previous_env = os.environ.get(ENV)
        os.environ[ENV] = str(log)  # the kernel inherits it: its progress lines go to the run's log
        try:
            with ProgressTail(log, prefix=f"[{name}] ") if progress else _nothing():
                pm.execute_notebook(str(source), str(out), parameters=params, progress_bar=False,
                                    cwd=str(notebook_dir()), kernel_name=kernel_name,
                                    extra_arguments=KERNEL_ARGUMENTS)
        except PapermillExecutionError as err:
            state.pop(name, None)
            write_json(state_path, state)
            raise StepFailed(f"{name} failed in cell {err.exec_count}: {err.ename}: {err.evalue} "
                             f"(executed notebook with the traceback: {out})") from None
        finally:
            if previous_env is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = previous_env
        seconds = time.perf_counter() - t0
        state[name] = {"hash": digest, "seconds": round(seconds, 2)}
        write_json(state_path, state)
        if progress:
            print(f"[{name}] done in {seconds:.1f} s", flush=True)
    summary = summarise_run(folder, cfg, state)
    summary["command"] = command or f"muva run --protocol '{cfg.data.protocol}'"
    write_json(folder / "metrics.json", summary)
    write_reports_index(resolve(cfg.reports_dir))
    return folder


@contextmanager
def _nothing():
    yield


def summarise_run(folder: Path, cfg: RunConfig, state: dict) -> dict:
    """The run's headline numbers from the notebooks' records: the model's metrics on the target, beside them
    (notebook 06) the chance level (random features) and the colour-histogram baselines on the same split, the
    predicted-mask IoU against the true part boxes, and the CLIP the run started from."""
    from ..pretrain.provision import clip_start

    metrics_dir = folder / "metrics"
    summary: dict = {"protocol": cfg.data.protocol, "run_dir": str(folder),
                     "seconds": round(sum(s.get("seconds", 0) for s in state.values()), 2),
                     "steps": {k: v.get("seconds") for k, v in state.items()},
                     "clip_start": clip_start(cfg)}
    for step in ("06_evaluate", "05_stage2", "train"):
        path = metrics_dir / f"{step}.json"
        if path.is_file():
            rec = json.loads(path.read_text())
            summary["metrics"] = rec.get("metrics")
            summary["mask_iou_truth"] = rec.get("mask_iou_truth", {})
            for key in ("metrics_reranked", "chance_level", "baselines"):
                if rec.get(key):
                    summary[key] = rec[key]
            break
    m, chance = summary.get("metrics") or {}, summary.get("chance_level") or {}
    if m.get("mAP") is not None and chance.get("mAP"):
        summary["mAP_over_chance"] = round(m["mAP"] / chance["mAP"], 2)
    cal = metrics_dir / "02_calibration.json"
    if cal.is_file():
        summary["calibration_iou"] = json.loads(cal.read_text()).get("iou")
    summary.update(training_summary(folder, cfg))
    return summary


def training_summary(folder: Path, cfg: RunConfig) -> dict:
    """What tells whether the run trained to the end and how far it generalises: the training identities and
    images, the last epoch's training-identity accuracy, each source's held-out split (never trained on), the
    per-epoch diagnostics (``eval_every``: held-out and target mAP by epoch), and the zero-shot accuracy of the
    language-pretrained CLIP it started from."""
    out: dict = {}
    train = folder / "metrics" / "train.json"
    if train.is_file():
        rec = json.loads(train.read_text())
        out.update({k: rec[k] for k in ("num_classes", "train_images", "heldout_source", "precision") if k in rec})
    hist = folder / "history_stage2.csv"
    if hist.is_file():
        import pandas as pd

        h = pd.read_csv(hist)
        if "train_id_acc" in h and len(h):
            out["train_id_acc_last"] = float(h["train_id_acc"].iloc[-1])
        cols = [c for c in h.columns if c.startswith(("heldout_mAP", "target_mAP"))]
        if cols:
            rows = h[["epoch", *cols]].dropna(how="all", subset=cols)
            out["by_epoch"] = {c: {int(e): round(float(v), 2) for e, v in zip(rows["epoch"], rows[c]) if v == v}
                               for c in cols}
    from ..model.checkpoints import config_clip_path
    from ..pretrain.files import read_pretrain_info
    from ..pretrain.provision import uses_pretrain_clip

    if uses_pretrain_clip(cfg) and config_clip_path(cfg).is_file():
        out["clip_zero_shot"] = read_pretrain_info(config_clip_path(cfg)).get("zero_shot")
    return out


def write_reports_index(reports_dir: Path) -> Path:
    """``reports/README.md``: one row per run (protocol, config, mAP, Rank-1, time, notebooks)."""
    reports_dir = Path(reports_dir)
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
        rr = rec.get("metrics_reranked") or {}
        rows.append(f"| {rec.get('protocol')} | [{rel.name}]({rel}/config.yaml) | {model} | {fmt(m.get('mAP'))} | "
                    f"{fmt(m.get('Rank-1'))} | {fmt(rr.get('mAP'))} / {fmt(rr.get('Rank-1'))} | "
                    f"{fmt(rec.get('seconds'))} | {nbs} |")
    text = ["# Runs", "", "Generated by `muva run` (muva_core/report/runner.py); one row per run folder.", "",
            "| protocol | run (config) | model | mAP | Rank-1 | re-ranked mAP / R-1 | time (s) | notebooks |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |", *rows, ""]
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
    available = sorted(p.stem for p in notebook_dir().glob("[0-9][0-9]_*.ipynb"))
    chosen: list[str] = []
    for part in text.split(","):
        m = re.fullmatch(r"(\d\d)(?:-(\d\d))?", part.strip())
        if not m:
            raise ValueError(f"--steps: expected NN, NN-MM or a comma list, got {part!r}")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        chosen += [n for n in available if lo <= int(n[:2]) <= hi and n not in chosen]
    if not chosen:
        raise ValueError(f"--steps {text}: no notebook matches; the notebooks are "
                         f"{', '.join(n[:2] for n in available)} ({available[0]} ... {available[-1]})")
    return chosen


RESULTS_START, RESULTS_END = "<!-- results:start -->", "<!-- results:end -->"


def results_table(reports_dir: Path) -> str:
    """The README's results table: one row per run folder with metrics, and the command that made it. Beside the
    model: the valid queries of the target split, the chance level (random features, mean of 20 draws) and the
    global colour-histogram baseline on the same split (mAP / Rank-1), where notebook 06 recorded them."""
    from ..pretrain.provision import clip_start

    lines = ["| protocol | model | mAP | Rank-1 | Rank-5 | mINP | re-ranked mAP / R-1 | valid queries | chance mAP / R-1 | "
             "colour histogram mAP / R-1 | mask IoU vs truth (head / upper / legs) | time | command |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for path in sorted(Path(reports_dir).glob("*/*/metrics.json")):
        rec = json.loads(path.read_text())
        m = rec.get("metrics")
        folder = path.parent
        if not m or "mAP" not in m or not (folder / "config.yaml").is_file():
            continue  # not a `muva run` folder (e.g. `muva baseline` output)
        cfg = RunConfig.from_yaml(folder / "config.yaml")
        model = f"{cfg.model.backbone} CLIP ({clip_start(cfg)}), {cfg.model.granularity}, {cfg.model.mask_mode} masks"
        iou = rec.get("mask_iou_truth") or {}
        iou_txt = " / ".join(f"{iou[p]:.2f}" for p in ("head", "upper", "legs") if p in iou) or "-"

        def pair(r: dict | None) -> str:
            return f"{r['mAP']:.1f} / {r['Rank-1']:.1f}" if r and "mAP" in r and "Rank-1" in r else "-"

        hist = (rec.get("baselines") or {}).get("hist-global")
        queries = m.get("num_valid_queries", "-")
        lines.append(f"| {rec['protocol']} | {model} | {m['mAP']:.1f} | {m['Rank-1']:.1f} | {m['Rank-5']:.1f} | "
                     f"{m['mINP']:.1f} | {pair(rec.get('metrics_reranked'))} | {queries} | "
                     f"{pair(rec.get('chance_level'))} | {pair(hist)} | {iou_txt} | "
                     f"{rec.get('seconds', 0):.0f} s | `{rec.get('command', '')}` |")
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
