"""`muva sweep`: ablation variants x seeds, read back when finished, one comparison table."""
from __future__ import annotations

import pandas as pd
import pytest

from muva_core.config import RunConfig
from muva_core.experiments import sweep as sweep_module
from muva_core.report.paper import ABLATIONS
from muva_core.experiments.sweep import VARIANTS, run_sweep, sweep_dir, variant_slug


def test_every_table_has_variants_matching_the_paper_rows():
    for table, rows in ABLATIONS.items():
        assert list(VARIANTS[table]) == list(rows), table
    for table, variants in VARIANTS.items():
        for overrides in variants.values():
            RunConfig().update(overrides)  # every override is a real config key with a valid type
    assert variant_slug("vision-only, multi-grained") == "vision-only-multi-grained"


def test_unknown_table_or_variant_fails():
    with pytest.raises(ValueError, match="ablation tables"):
        run_sweep(RunConfig(), 4)
    with pytest.raises(ValueError, match="no variant"):
        run_sweep(RunConfig(), 8, variants=["diagonal"])


@pytest.mark.slow
def test_one_process_and_three_sharing_the_sweep_write_the_same_table(small_synth_root, tmp_path, capsys,
                                                                      monkeypatch):
    """One process trains every variant x seed and reads them back. Meanwhile, elsewhere, three processes started
    at once on the same sweep (two with --shard 0/2 and 1/2, one without) train every run exactly once (counted
    from their outputs and the runs' training records) and write the same table; --collect writes it from the
    finished runs, or names the runs missing or locked."""
    import json
    import os
    import re
    import shlex
    from collections import Counter
    from pathlib import Path

    import torch

    from muva_core.cli import main
    from muva_core.config import resolve_config
    from muva_core.locks import LOCK_NAME, hold
    from muva_core.runs import run_folder
    from test_cluster import SWEEP, _done, _muva
    from test_readme_commands import _params, tiny

    alone = tiny(tmp_path, small_synth_root, reports_dir=str(tmp_path / "alone"))
    shared = {**alone, "reports_dir": str(tmp_path / "reports")}
    small = _params(shared) + ["--seeds", "0,1", "--quiet"]
    procs = {name: _muva(command, small) for name, command in
             (("shard 0/2", f"{SWEEP} --shard 0/2"), ("shard 1/2", f"{SWEEP} --shard 1/2"), ("no shard", SWEEP))}

    cfg = resolve_config("synth:A2B", overrides=alone)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # as the processes (OMP_NUM_THREADS=1): the same floats
    try:
        summary = run_sweep(cfg, 8, seeds=[0, 1], progress=False)
    finally:
        torch.set_num_threads(threads)
    assert list(summary.index) == ["stripe-like", "AM-MSA"]
    assert (summary["seeds"] == 2).all()
    assert summary["mAP std"].notna().all()
    assert summary.loc["AM-MSA", "paper MA2MS mAP"] == 27.6
    assert pd.isna(summary.loc["stripe-like", "mask IoU"])  # stripes predict no masks
    assert 0 <= summary.loc["AM-MSA", "mask IoU"] <= 1
    reference = sweep_dir(cfg, 8)
    assert (reference / "table8.md").read_text().startswith("# Table 8 on synth:A2B")
    assert len(pd.read_csv(reference / "table8-runs.csv")) == 4

    def no_training(*args, **kwargs):
        raise AssertionError("finished runs must be read back, not retrained")

    with monkeypatch.context() as patched:
        patched.setattr("muva_core.runs.train_protocol", no_training)
        again = sweep_module.run_sweep(cfg, 8, seeds=[0, 1], progress=False)
    pd.testing.assert_frame_equal(again, summary)

    outputs = {name: _done(proc) for name, proc in procs.items()}
    trained = {name: re.findall(r"^trained (\S+)$", out, re.M) for name, out in outputs.items()}
    counts = Counter(run for runs in trained.values() for run in runs)
    runs = sorted((tmp_path / "reports" / "synth_A2B" / "sweep-runs").iterdir())
    assert len(runs) == 4 and sorted(counts) == [str(r) for r in runs], outputs
    assert set(counts.values()) == {1}, counts          # every run trained exactly once
    for name, proc in procs.items():
        for run in trained[name]:                       # by the process that says so (its training record)
            assert json.loads((Path(run) / "metrics" / "train.json").read_text())["trained_by"]["pid"] == proc.pid
            assert len(pd.read_csv(Path(run) / "history_stage2.csv")) == 1
        assert "Traceback" not in outputs[name]
    assert not [r for r in runs if (r / LOCK_NAME).exists()]
    # a process that met a run locked by another one named it and its holder; the table was written by the
    # process that finished last, and it equals the table of the one process
    for line in re.findall(r"^skipped .*$", "\n".join(outputs.values()), re.M):
        assert re.search(r"locked by host \S+, pid \d+ \(muva_core\.cli sweep --table 8", line), line
    assert sum("wrote " in out for out in outputs.values()) >= 1
    table = tmp_path / "reports" / "synth_A2B" / "sweep-table8"
    for name in ("table8.md", "table8.csv"):
        assert (table / name).read_text() == (reference / name).read_text(), name

    # --collect: the table from the finished runs, nothing trained; with runs missing, or locked, it names them
    collect = shlex.split(f"{SWEEP} --collect")[1:]
    (table / "table8.md").unlink()
    capsys.readouterr()
    assert main([*collect, *small]) == 0
    assert (table / "table8.md").read_text() == (reference / "table8.md").read_text()
    assert "trained " not in capsys.readouterr().out
    assert main([*collect, *_params(shared), "--quiet"]) == 2          # seeds 0, 1, 2 as the page writes
    err = capsys.readouterr().err
    assert "table 8 on synth:A2B: 2 of 6 runs not done" in err
    assert re.search(r"run-\w+ \(stripe-like, seed 2\): not started", err)
    assert re.search(r"run-\w+ \(AM-MSA, seed 2\): not started", err)
    assert len(list((tmp_path / "reports" / "synth_A2B" / "sweep-runs").iterdir())) == 4   # nothing trained
    seed2 = run_folder(sweep_module.variant_config(resolve_config("synth:A2B", overrides=shared), 8, "AM-MSA", 2))
    with hold(seed2):
        assert main([*collect, *_params(shared), "--quiet"]) == 2
        err = capsys.readouterr().err
    assert "(AM-MSA, seed 2): being trained by host " in err and f"pid {os.getpid()} " in err
