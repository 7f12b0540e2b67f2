"""``muva sweep``: the variants of one of the paper's ablation tables (5-12) on a protocol.

Each variant is a set of config overrides; each (variant, seed) is one resumable training run
(``muva_core.train.run.train_protocol``) in ``reports/<protocol>/sweep-runs/run-<config hash>/``
(the seed is part of the configuration). Finished runs are read back, not retrained, and a
configuration shared by several tables is trained once. The comparison table (mean and standard deviation
over seeds of mAP, Rank-1 and the predicted-mask IoU against ground-truth boxes, beside the
paper's numbers for MA->MS and MS->MA) is written as markdown and CSV.

Several processes (machines, array tasks) share the runs through the run folders' locks
(:mod:`muva_core.locks`, :func:`train_runs`): each trains the runs that are neither done nor locked by
another process and skips the others, saying who holds them; ``shard=(i, n)`` restricts a process to every
n-th run of the list sorted by configuration hash (the same list on every machine). The table is written by
the process that finds every run done; ``collect=True`` trains nothing and fails naming the runs missing.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from ..paths import RunFiles, portable, resolve
from ..config import RunConfig
from ..data.protocols import get_protocol, protocol_slug
from ..io import atomic_path
from ..report.paper import ABLATIONS

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
    from ..config import config_hash

    run = copy.deepcopy(cfg).update({**VARIANTS[table][variant], "seed": seed})
    slug = protocol_slug(get_protocol(cfg.data.protocol).name)
    run.run_dir = portable(resolve(cfg.reports_dir) / slug / "sweep-runs" / f"run-{config_hash(run)}")
    return run


def run_record(run: RunConfig) -> Path:
    """A run's ``metrics/train.json``: there once the run is done."""
    return RunFiles(resolve(run.run_dir)).record_path("train")


class RunsIncomplete(RuntimeError):
    """Runs a table needs are not done; the message names each and its state."""


def all_done(missing: Sequence[str], total: int, what: str, output: str, collect: bool) -> bool:
    """True when no run is ``missing``; else, with ``collect``, :class:`RunsIncomplete` naming them, without it
    a printed list and False (``output`` is written by the process that finishes the last run)."""
    if not missing:
        return True
    text = f"{what}: {len(missing)} of {total} runs not done:\n  " + "\n  ".join(missing)
    if collect:
        raise RunsIncomplete(text)
    print(f"{text}\n{output} is written by the process that finishes the last run (or by the same command with "
          "--collect once they are done)", flush=True)
    return False


def pending_runs(runs: Iterable[tuple[str, RunConfig]]) -> list[str]:
    """For each run (``(label, config)``) that is not done: its folder, its label and its state (being trained by
    whom, stopped, or not started)."""
    from ..locks import describe, is_stale, read_lock

    lines = []
    for label, run in runs:
        if run_record(run).is_file():
            continue
        folder = resolve(run.run_dir)
        lock = read_lock(folder) if folder.is_dir() else None
        if lock and not is_stale(*lock):
            state = f"being trained by {describe(*lock)}"
        elif lock:
            state = f"stopped: its holder died ({describe(*lock)}); run the command again to resume it"
        elif RunFiles(folder).config.is_file():
            state = "started, not finished: run the command again to resume it"
        else:
            state = "not started"
        lines.append(f"{portable(folder)} ({label}): {state}")
    return lines


def _run_key(run: RunConfig) -> tuple[str, str]:
    return Path(run.run_dir).name, run.run_dir


def shard_runs(runs: Sequence[RunConfig], shard: tuple[int, int] | None) -> list[RunConfig]:
    """Shard ``(i, n)`` of ``runs``: every n-th run from the i-th, in the order of their folders' configuration
    hashes (so every machine computes the same shards from the same command); all runs when ``shard`` is None."""
    from ..grounding.labelling import select_shard

    return list(runs) if shard is None else select_shard(list(runs), *shard, key=_run_key)


def prepare_shared(runs: Sequence[RunConfig], progress: bool = True) -> None:
    """Generate the data and the pseudo-label masks once per distinct data + grounding settings, one process at a
    time (:func:`muva_core.locks.shared_data`), before trainings that would otherwise make the same caches side
    by side; the others wait, then find them made."""
    import dataclasses

    from ..grounding.steps import prepare_masks
    from ..locks import shared_data
    from ..data.protocols import load_protocol, source_datasets

    seen = set()
    for run in runs:
        key = json.dumps([dataclasses.asdict(run.data), dataclasses.asdict(run.grounding)], sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            with shared_data(run):
                prepare_masks(run, source_datasets(load_protocol(run, progress=progress)), progress=progress)


def train_run(run: RunConfig, wait: bool = False, progress: bool = True) -> tuple[str, str | None]:
    """Train one run unless it is done or another process holds its lock: ``("trained" | "done" | "held", who
    holds it)``. With ``wait`` a held run is waited for (then trained, unless its holder finished it)."""
    from ..locks import LockHeld, hold
    from ..runs import train_protocol

    if run_record(run).is_file():
        return "done", None
    try:
        with hold(resolve(run.run_dir), wait=wait):
            if run_record(run).is_file():  # finished by another process since the first look
                return "done", None
            train_protocol(run, progress=progress)
    except LockHeld as err:
        from ..locks import describe

        return "held", describe(err.holder, err.age)
    return "trained", None


def _train_in_worker(flat: dict, threads: int, wait: bool) -> tuple[str, str | None]:
    """:func:`train_run` in a pool process (``flat`` = its config, ``run_dir`` included)."""
    import multiprocessing

    import torch

    # the pool's workers are spawned, and their children would be too: each data loader worker would import
    # torch again (~4 s of CPU, and a run makes many loaders). Fork them, as a plain process would.
    if "fork" in multiprocessing.get_all_start_methods():
        multiprocessing.set_start_method("fork", force=True)
    torch.set_num_threads(threads)
    return train_run(RunConfig().update(flat), wait=wait, progress=False)


def _train_each(runs: Sequence[RunConfig], jobs: int, wait: bool, progress: bool):
    """``(run, (status, holder))`` for each run as it finishes; ``jobs`` at once in spawned processes."""
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    if jobs <= 1:
        for run in runs:
            yield run, train_run(run, wait=wait, progress=progress)
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_train_in_worker, run.to_flat(), threads, wait): run for run in runs}
        for fut in as_completed(futures):
            try:
                outcome = fut.result()
            except Exception as exc:
                pool.shutdown(wait=True, cancel_futures=True)  # stop at the first failure
                raise RuntimeError(f"run {futures[fut].run_dir} failed: {exc}") from exc
            yield futures[fut], outcome


def train_runs(runs: Sequence[RunConfig], jobs: int = 1, shard: tuple[int, int] | None = None, wait: bool = False,
               progress: bool = True, what: str = "sweep") -> dict[str, list]:
    """Train the runs (of ``shard``) that are not done, ``jobs`` at once, sharing them with any other process
    doing the same through the run folders' locks: a run another process holds is skipped (saying who holds it);
    with ``wait`` the skipped ones are waited for at the end (and trained when their holder died). Returns
    ``{"trained": [run_dir, ...], "skipped": [line, ...]}``; one line per trained or skipped run is printed."""
    from tqdm.auto import tqdm

    mine = shard_runs(runs, shard)
    todo = [r for r in mine if not run_record(r).is_file()]
    share = f", shard {shard[0]}/{shard[1]}: {len(mine)}" if shard else ""
    print(f"{what}: {len(runs)} runs{share}, {len(mine) - len(todo)} done, {len(todo)} to train ({jobs} at a time)",
          flush=True)
    trained: list[str] = []
    skipped: list[str] = []
    if not todo:
        return {"trained": trained, "skipped": skipped}
    prepare_shared(todo, progress)
    bar = tqdm(total=len(todo), desc=f"{what} runs", unit="run", disable=not progress)
    for waiting in ((False, True) if wait else (False,)):
        held = []
        for run, (status, holder) in _train_each(todo, jobs, waiting, progress):
            if status == "held":
                held.append(run)
                line = f"skipped {portable(run.run_dir)}: locked by {holder}"
                skipped.append(line)
                tqdm.write(line + (" (waited for at the end)" if wait and not waiting else ""))
                continue
            if status == "trained":
                trained.append(run.run_dir)
                tqdm.write(f"trained {portable(run.run_dir)}")
            bar.update(1)
        todo = held
        if not todo:
            break
    bar.close()
    return {"trained": trained, "skipped": skipped}


def table_variants(table: int, variants: Sequence[str] | None = None) -> list[str]:
    """The variants of ``table`` to run (all by default); an unknown table or variant is an error."""
    if table not in VARIANTS:
        raise ValueError(f"--table: ablation tables are {sorted(VARIANTS)}, got {table}")
    names = list(variants or VARIANTS[table])
    unknown = [v for v in names if v not in VARIANTS[table]]
    if unknown:
        raise ValueError(f"table {table} has no variant(s) {unknown}; variants: {list(VARIANTS[table])}")
    return names


def run_sweep(cfg: RunConfig, table: int, seeds: Sequence[int] = (0,), variants: Sequence[str] | None = None,
              progress: bool = True, shard: tuple[int, int] | None = None, wait: bool = False,
              collect: bool = False, out: Path | None = None, command: str | None = None) -> pd.DataFrame | None:
    """Every variant x seed of ``table``: trains what is missing (:func:`train_runs`), then, when every run is
    done, writes ``table<N>.md`` / ``.csv`` (into ``out``, default :func:`sweep_dir`; ``command``: what the page
    says made it, default the ``muva sweep`` command) and returns the summary frame; None when runs of other
    processes are not done yet (they are listed). ``collect``: train nothing; :class:`RunsIncomplete` names the
    runs missing."""
    names = table_variants(table, variants)
    runs = {f"{name}, seed {seed}": variant_config(cfg, table, name, seed) for name in names for seed in seeds}
    if not collect:
        train_runs(list(runs.values()), shard=shard, wait=wait, progress=progress, what=f"table {table}")
    if not all_done(pending_runs(runs.items()), len(runs), f"table {table} on {cfg.data.protocol}", "the table",
                    collect):
        return None
    rows = []
    for name in names:
        for seed in seeds:
            run = runs[f"{name}, seed {seed}"]
            rec = json.loads(run_record(run).read_text())
            row = {"variant": name, "seed": seed, "mAP": rec["metrics"]["mAP"], "Rank-1": rec["metrics"]["Rank-1"],
                   "seconds": _seconds(run, rec), "precision": _precision(rec), "start": _start(rec),
                   "run": run.run_dir}
            iou = rec.get("mask_iou_truth") or {}
            row["mask IoU"] = float(np.mean(list(iou.values()))) if iou else np.nan
            held = [h["metrics"]["mAP"] for h in (rec.get("heldout_source") or {}).values()]
            row["held-out mAP"] = float(np.mean(held)) if held else np.nan   # the sources' own test splits
            rows.append(row)
    per_run = pd.DataFrame(rows)
    summary = summarise(per_run, table)
    write_sweep(summary, per_run, out or sweep_dir(cfg, table), table, cfg.data.protocol, seeds, command)
    return summary


def _seconds(run: RunConfig, rec: dict) -> float | None:
    """A run's training time: its epochs' seconds from the histories (every resumed segment), else the record's."""
    from ..train.run import epoch_seconds

    seconds = epoch_seconds(resolve(run.run_dir))
    return rec.get("seconds") if seconds is None else round(seconds, 1)


def _precision(rec: dict) -> str:
    """The arithmetic of the run's last process, as its record notes it (``bfloat16``, ``float16``, ``float32``;
    ``""`` for runs recorded before the note existed)."""
    note = str(rec.get("precision") or "").split()
    return note[0] if note else ""


def _start(rec: dict) -> str:
    """The first 12 hex digits of the SHA-256 of the weights of the CLIP file the run started from, as its record
    says (``""`` for runs from random weights or recorded before the digest was)."""
    digest = (rec.get("start_checkpoint") or {}).get("weights_sha256")
    return str(digest)[:12] if digest else ""


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
                seeds: Sequence[int], command: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / f"table{table}.csv") as tmp:
        summary.to_csv(tmp)
    with atomic_path(folder / f"table{table}-runs.csv") as tmp:
        per_run.to_csv(tmp, index=False)
    seeds_txt = " ".join(str(s) for s in seeds)
    command = command or f"muva sweep --table {table} --protocol '{protocol}' --seeds {seeds_txt}"
    text = (f"# Table {table} on {protocol}\n\n"
            f"`{command}`; mean (std) over seeds; "
            "mask IoU = predicted part masks vs ground-truth part boxes on the target (synthetic only).\n\n"
            + summary.round(2).to_markdown() + "\n")
    with atomic_path(folder / f"table{table}.md") as tmp:
        tmp.write_text(text)
