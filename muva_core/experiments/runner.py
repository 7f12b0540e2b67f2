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

from ..config import ConfigError, RunConfig
from ..io import write_json
from ..report.index import write_reports_index
from ..paths import RunFiles, notebook_dir, resolve

PIPELINE = ("01_grounding", "02_calibration", "03_mask_voting", "04_stage1_prompts", "05_stage2_reid", "06_evaluate",
            "07_figures")


class StepFailed(RuntimeError):
    """A notebook raised; the message names the notebook, the cell and the error."""


def _notebook_parameters(path: Path) -> list[str]:
    import papermill as pm

    return list(pm.inspect_notebook(str(path)))


KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=CRITICAL"]
"""The kernel's own log stays quiet: no "Kernel is running over TCP without encryption" per notebook, and no
"KeyboardInterrupt caught in kernel." when jupyter_client's shutdown (which always sends SIGINT first) reaches a
kernel still busy with a message, as it does on a loaded machine. Errors in a notebook still reach the runner
as execution errors (papermill reads them from the cells, not from this log)."""


def run_notebooks(cfg: RunConfig, steps: Sequence[str] = PIPELINE, run_id: str | None = None,
                  force: bool = False, progress: bool = True, kernel_name: str = "python3",
                  command: str | None = None, wait: bool = False) -> Path:
    """Execute ``steps`` in order into the run folder; returns the folder.

    Before any kernel starts: the steps exist, the configuration is checked, the run folder holds the same
    configuration (or is refused), the datasets are there and the batches can be formed: :func:`muva_core.runs.open_run`;
    a failed check leaves no folder behind. Before a paper protocol the doctor's
    short form is printed (:func:`muva_core.report.doctor.short_report`). Each notebook runs with its
    kernel in ``notebooks/``, as JupyterLab starts it; its progress lines (epochs, resumes) are printed
    here while it runs. ``command`` is the command line that reproduces the run (in ``metrics.json``).
    The run folder is locked while the notebooks run (their kernels inherit the lock, see
    :mod:`muva_core.locks`): another process's live lock raises :class:`~muva_core.locks.LockHeld` naming its
    holder, or is waited for with ``wait``."""
    from ..runs import open_run

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
    fresh = not cfg.train.resume
    run = open_run(cfg, progress=progress, wait=wait, keep_lock=True, run_id=run_id)
    try:
        if progress and not run.data.protocol.synthetic:  # a paper protocol: what decides whether it can reproduce it
            from ..report.doctor import short_report

            print(short_report(cfg, run.data), flush=True)
        if fresh:  # started afresh once, by open_run; the notebooks then continue in the fresh folder
            cfg.train.resume = True
        return _execute(run, sources, force, progress, kernel_name, command)
    finally:
        run.close()


def _execute(run, sources: dict[str, Path], force: bool, progress: bool, kernel_name: str,
             command: str | None) -> Path:
    """The notebooks of :func:`run_notebooks`, run in the opened (checked, locked, claimed) run folder."""
    import os

    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    from ..progress import ENV, ProgressTail

    cfg, folder = run.cfg, run.folder
    run.notebooks.mkdir(exist_ok=True)
    state_path = run.steps
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    params = cfg.to_flat()
    log = run.progress_log
    logging.getLogger("papermill").setLevel(logging.ERROR)  # not "unknown parameter" for every key
    for name, source in sources.items():
        digest = hashlib.sha1(source.read_bytes() + json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()
        out = run.notebook(name)
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
    write_json(run.summary, summary)
    write_reports_index(resolve(cfg.reports_dir))
    return folder


@contextmanager
def _nothing():
    yield


def summarise_run(folder: Path, cfg: RunConfig, state: dict) -> dict:
    """The run's headline numbers from the notebooks' records: the model's metrics on the target, beside them
    (notebook 06) the chance level (random features) and the colour-histogram baselines on the same split, the
    predicted-mask IoU against the true part boxes, and the CLIP the run started from."""
    from ..model.checkpoints import clip_start

    files = RunFiles(folder)
    summary: dict = {"protocol": cfg.data.protocol, "run_dir": str(folder),
                     "seconds": round(sum(s.get("seconds", 0) for s in state.values()), 2),
                     "steps": {k: v.get("seconds") for k, v in state.items()},
                     "clip_start": clip_start(cfg)}
    for step in ("06_evaluate", "05_stage2", "train"):
        path = files.record_path(step)
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
    cal = files.record_path("02_calibration")
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
    files = RunFiles(folder)
    train = files.record_path("train")
    if train.is_file():
        rec = json.loads(train.read_text())
        out.update({k: rec[k] for k in ("num_classes", "train_images", "heldout_source", "precision") if k in rec})
    hist = files.history(2)
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
    from ..model.checkpoints import config_clip_path, uses_pretrain_clip
    from ..pretrain.files import read_pretrain_info

    if uses_pretrain_clip(cfg) and config_clip_path(cfg).is_file():
        out["clip_zero_shot"] = read_pretrain_info(config_clip_path(cfg)).get("zero_shot")
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


DEMO_PROTOCOL = "synth:A2B"
"""The protocol of ``make demo`` / ``muva demo``."""

DEMO_FIGURES = {
    "07_figure7_predicted_masks.png": ("reports/demo-part-masks.png",
                                       "figure 7 (predicted part masks on the unseen domain)"),
    "06_ranked_lists.png": ("reports/demo-ranked-lists.png", "ranked lists (best, median, worst target query by AP)"),
}
"""What ``muva demo`` copies from the run's figures to the paths the README shows (run figure -> (path, what))."""


def demo_summary(folder: Path, publish: bool) -> list[str]:
    """The lines ``muva demo`` prints after its run: the chance level and the colour histograms beside the model,
    and (``publish``: the demo's own run) where its Figure 7 and ranked lists were copied (:data:`DEMO_FIGURES`)."""
    import shutil

    files = RunFiles(folder)
    summary = json.loads(files.summary.read_text())
    lines = []
    chance, hist = summary.get("chance_level"), (summary.get("baselines") or {}).get("hist-global")
    m = summary.get("metrics") or {}
    if chance and m:
        lines.append(f"beside it on the same {m.get('num_valid_queries')} queries: random features mAP "
                     f"{chance['mAP']:.1f} Rank-1 {chance['Rank-1']:.1f} (mean of 20 draws; the model: "
                     f"{summary.get('mAP_over_chance')}x)"
                     + (f", colour histograms mAP {hist['mAP']:.1f} Rank-1 {hist['Rank-1']:.1f}" if hist else ""))
    for name, (path, what) in DEMO_FIGURES.items():
        figure = files.figures / name
        if publish and figure.is_file():
            target = resolve(path)
            if not target.is_file() or target.read_bytes() != figure.read_bytes():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(figure, target)
            lines.append(f"{what}: {target}")
    return lines
