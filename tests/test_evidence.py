"""`muva evidence`: claims judged against seed noise; the small-scale study produces every table."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from muva_core.experiments import evidence
from muva_core.experiments.evidence import (RECIPE_TABLES, PROTOCOLS, TABLES, claim_variants, clip_command, plan_runs,
                                             protocol_configs, run_evidence, scale_clip, scale_overrides,
                                             scale_protocols)
from muva_core.model.checkpoints import weights_sha256
from muva_core.report.evidence import CLAIMS, evaluate_claims, verdict
from muva_core.report.paper import ABLATIONS


def test_every_claim_names_rows_of_the_paper_table():
    for claim in CLAIMS:
        assert claim.better in ABLATIONS[claim.table] and claim.worse in ABLATIONS[claim.table]
    assert {c.table for c in CLAIMS} == set(TABLES)


def test_only_the_variants_a_claim_compares_are_trained():
    assert claim_variants(5) == ["G", "G+H", "G+U", "G+L", "G+H+U+L"]
    assert claim_variants(8) == ["stripe-like", "AM-MSA"]


def test_full_scale_plan_shares_the_full_model_and_shortens_multi_source(tmp_path):
    base = {"checkpoint_path": str(tmp_path / "clip.safetensors"), "reports_dir": str(tmp_path / "reports")}
    single = scale_overrides("full", "synth:A2B", base, progress=False)
    multi = scale_overrides("full", "synth:B+C+D->A", base, progress=False)
    assert single["stage2_epochs"] == 4 and multi["stage2_epochs"] == 2
    assert single["checkpoint_path"] == base["checkpoint_path"]  # the user's checkpoint wins: nothing pretrained
    assert scale_overrides("full", "synth:A2B", {**base, "stage2_epochs": 5}, progress=False)["stage2_epochs"] == 5
    runs = plan_runs(protocol_configs(base, "full", PROTOCOLS, progress=False), TABLES, (0, 1, 2))
    # per protocol and seed: Table 5's 5 compared rows (the full model among them) + 2 (Table 6) + 1 + 1
    assert len(runs) == len({r.run_dir for r in runs}) == 3 * 3 * 9
    assert {r.data.synth_scale for r in runs} == {"evidence"}
    assert [r.seed for r in runs[:9]] == [0] * 9  # seed-major within a protocol
    with pytest.raises(ValueError, match="--scale"):
        scale_overrides("huge", "synth:A2B", base)


def test_regime_scale_trains_re_id_sized_sources_to_the_end_from_the_wide_clip(tmp_path):
    """Issue 18's study: the `reid` sources, 28 epochs, the mini CLIP of the documented wide pretraining, the
    variants cut to the pairs the claims judge; the user's checkpoint wins."""
    from pathlib import Path

    base = {"reports_dir": str(tmp_path / "reports"), "data_root": str(tmp_path / "data")}
    configs = protocol_configs(base, "regime", scale_protocols("regime"), progress=False, make_clip=False)
    assert list(configs) == ["synth:A2B", "synth:C2D"]
    clip = tmp_path / "data" / "clip-wide-one" / "clip-mini-192x96-seed0.safetensors"
    for cfg in configs.values():
        assert (cfg.data.synth_scale, cfg.model.backbone, cfg.data.height, cfg.data.width) == ("reid", "mini", 192, 96)
        assert (cfg.train.stage2_epochs, cfg.train.lr_milestones, cfg.train.stage2_lr) == (28, [24], 3e-4)
        assert Path(cfg.model.checkpoint_path) == clip and cfg.model.pretrained == "none"
    runs = plan_runs(configs, TABLES, (0, 1, 2), "regime")
    # per protocol and seed: G and G+H+U+L (Table 5, cut), the two vision-only rows, stripes, w/o calibration
    assert len(runs) == len({r.run_dir for r in runs}) == 2 * 3 * 6
    assert {r.model.granularity for r in runs} == {"G", "G+H+U+L"}
    assert claim_variants(5, "regime") == ["G", "G+H+U+L"] and claim_variants(8, "regime") == claim_variants(8)
    assert scale_overrides("regime", "synth:B+C+D->A", base, progress=False)["stage2_epochs"] == 10
    mine = str(tmp_path / "mine.safetensors")
    own = protocol_configs({**base, "checkpoint_path": mine}, "regime", ["synth:A2B"], progress=False)
    assert own["synth:A2B"].model.checkpoint_path == mine and not clip.exists()   # nothing pretrained
    random = protocol_configs({**base, "pretrained": "none"}, "regime", ["synth:A2B"], progress=False)["synth:A2B"]
    assert random.model.checkpoint_path == "" and random.model.pretrained == "none" and not clip.exists()
    # the CLIP is the one docs/pretraining.md makes (clip5 there), by the same command
    docs = (Path(__file__).resolve().parents[1] / "docs" / "pretraining.md").read_text()
    command = clip_command(scale_clip("regime", "data"), "data/synthetic-reid")
    assert command == ("muva pretrain-clip --out data/clip-wide-one --backbone mini --image-size 192x96 --epochs 16 "
                       "--scale pretrain-wide --color-jitter --loss multi_positive --batch-granularity one "
                       "--reid-root data/synthetic-reid --threads 1") and command in docs


@pytest.mark.parametrize("late", [{}, {"color_jitter": True}, {"color_jitter": True, "jitter_ranges": "wide"},
                                  {"loss": "multi_positive", "hard_negatives": 2, "batch_granularity": "one"}])
def test_the_clip_command_makes_the_checkpoint_of_its_spec(late, monkeypatch):
    """Every option a scale's CLIP sets away from its default is written as a flag, so the documented command
    rebuilds the same reuse key (the command is parsed and run by the CLI up to the pretraining call)."""
    import shlex

    from muva_core import cli
    from muva_core.pretrain import loop, provision
    from muva_core.pretrain.config import LATE_OPTIONS, PretrainConfig

    spec = {"out_dir": "data/clip-x", "backbone": "mini", "image_size": (192, 96), "epochs": 16,
            "scale": "pretrain-wide", "seed": 3, "threads": 1, **late}
    seen = {}
    monkeypatch.setattr(loop, "pretrain_clip", lambda out, **kw: seen.update(kw) or out)
    monkeypatch.setattr(provision, "pretrain_clip_summary", lambda *a: "")
    argv = shlex.split(clip_command(spec))[1:]
    assert cli.main(argv) == 0
    assert seen["threads"] == 1                 # made on the spec's threads (not a setting of the reuse key)
    made = {k: v for k, v in seen.items() if k not in ("synth_root", "overwrite", "progress", "reid_root", "threads")}
    wanted = PretrainConfig(**{k: v for k, v in spec.items() if k not in ("out_dir", "threads")})
    assert PretrainConfig(**made).settings() == wanted.settings()
    assert set(wanted.changed_late_options()) == set(late) and set(late) <= set(LATE_OPTIONS)


def test_regime_scale_makes_its_clip_when_missing_and_reuses_it(small_synth_root, tmp_path, monkeypatch, capsys):
    """The study pretrains the CLIP its scale names before any run (here a tiny one, 1 epoch on the small set)."""
    from muva_core.pretrain.files import read_pretrain_report

    import torch

    tiny = {"folder": "clip-wide", "backbone": "tiny", "image_size": (192, 96), "epochs": 1, "scale": "small",
            "color_jitter": True, "seed": 0, "threads": 1, "weights_sha256": "0" * 64}
    monkeypatch.setitem(evidence.SCALES["regime"], "clip", tiny)
    threads = torch.get_num_threads()
    base = {"reports_dir": str(tmp_path / "reports"), "data_root": str(tmp_path / "data"),
            "synth_root": str(small_synth_root), "synth_scale": "small"}
    cfg = protocol_configs(base, "regime", ["synth:A2B"])["synth:A2B"]
    made = tmp_path / "data" / "clip-wide" / "clip-tiny-192x96-seed0.safetensors"
    assert cfg.model.checkpoint_path == str(made) and made.is_file()
    report = read_pretrain_report(made)
    assert report["settings"]["color_jitter"] and report["settings"]["epochs"] == 1
    assert "A" in report["zero_shot"]["reid_domains"]          # scored on the study's Re-ID domains
    assert report["threads"] == 1 and torch.get_num_threads() == threads   # made on one thread, the rest left alone
    # not the build the study names: said (the page counts the runs per build)
    digest = weights_sha256(made)
    err = capsys.readouterr().err
    assert f"is another build of the study's CLIP (weights SHA-256 {digest[:12]}" in err and "0" * 12 in err
    monkeypatch.setitem(tiny, "weights_sha256", digest)
    protocol_configs(base, "regime", ["synth:A2B"])
    out, err = capsys.readouterr()
    assert "reusing" in out and "another build" not in err


def test_verdict_against_twice_the_standard_error():
    assert verdict(3.0, 1.0) == "holds"
    assert verdict(1.5, 1.0) == "within seed noise"
    assert verdict(-2.5, 1.0) == "reversed"
    assert verdict(1.0, math.nan) == "one seed: no verdict"


def test_claims_from_hand_made_runs():
    rows = []
    for seed, (full, glob) in enumerate([(30.0, 20.0), (32.0, 21.0), (31.0, 19.0)]):
        rows.append({"table": 5, "protocol": "synth:A2B", "variant": "G+H+U+L", "seed": seed, "mAP": full, "Rank-1": 50.0 + seed})
        rows.append({"table": 5, "protocol": "synth:A2B", "variant": "G", "seed": seed, "mAP": glob, "Rank-1": 50.0 - seed})
    claims = evaluate_claims(pd.DataFrame(rows))
    m = claims[(claims["metric"] == "mAP") & (claims["claim"].str.startswith("all granularities"))].iloc[0]
    assert m["difference"] == pytest.approx(11.0)
    # std of (30, 32, 31) and (20, 21, 19) are both 1: se = sqrt(1/3 + 1/3)
    assert m["std error"] == pytest.approx(round(math.sqrt(2 / 3), 2))
    assert m["verdict"] == "holds"
    assert m["paper MA2MS"] == pytest.approx(27.6 - 26.0, abs=0.05)
    r1 = claims[(claims["metric"] == "Rank-1") & (claims["claim"].str.startswith("all granularities"))].iloc[0]
    assert r1["difference"] == pytest.approx(2.0) and r1["verdict"] == "holds"  # 2 > 2 * 0.82


def test_the_page_says_where_the_runs_start_when_the_command_names_a_checkpoint(tmp_path):
    """A page collected with ``-p checkpoint_path=...`` (the runs of an earlier CLIP) names that checkpoint and the
    command's settings, not the scale's CLIP or random weights."""
    from muva_core.report.evidence import write_evidence

    rows = [{"table": 5, "protocol": "synth:A2B", "variant": v, "seed": 0, "mAP": m, "Rank-1": m, "mask IoU": 0.5,
             "recipe": "workbook"} for v, m in (("G", 15.0), ("G+H+U+L", 14.0))]
    runs = pd.DataFrame(rows)
    clip = "muva pretrain-clip --out data/clip-wide-one --backbone mini"
    page = tmp_path / "page.md"
    kwargs = dict(settings=evidence.SCALES["regime"], recipes={"workbook": (5,)}, clip=clip)
    write_evidence(page, evaluate_claims(runs), runs, "regime", (0,), ("synth:A2B",), **kwargs)
    assert f"starting from the language-pretrained CLIP of `{clip}`" in page.read_text()
    old = "data/clip-wide/clip-mini-192x96-seed0.safetensors"
    write_evidence(page, evaluate_claims(runs), runs, "regime", (0,), ("synth:A2B",),
                   **{**kwargs, "clip": None}, user={"checkpoint_path": old})
    text = page.read_text()
    assert f"starting from the checkpoint `{old}`" in text and '`{"checkpoint_path": "' in text
    assert "random weights" not in text and "clip-wide-one" not in text


def test_the_page_says_how_long_the_runs_took_counting_every_resumed_part(tmp_path):
    """A run's seconds are its epochs' seconds from both histories (a resumed run's record only has its last
    process's); the page sums them."""
    from muva_core.paths import RunFiles
    from muva_core.report.evidence import write_evidence
    from muva_core.train.run import epoch_seconds

    folder = tmp_path / "run-1"
    folder.mkdir()
    assert epoch_seconds(folder) is None
    files = RunFiles(folder)
    pd.DataFrame({"epoch": [1, 2], "loss": [1.0, 0.5], "seconds": [10.0, 20.0]}).to_csv(files.history(1), index=False)
    # stage 2: epochs 1-2 by one process, 3-4 by the process that resumed it
    pd.DataFrame({"epoch": [1, 2, 3, 4], "seconds": [600.0, 600.0, 900.0, 870.0]}).to_csv(files.history(2),
                                                                                          index=False)
    assert epoch_seconds(folder) == 3000.0
    rows = [{"table": 5, "protocol": "synth:A2B", "variant": v, "seed": 0, "mAP": 10.0, "Rank-1": 10.0,
             "mask IoU": 0.5, "recipe": "workbook", "seconds": sec, "run": f"runs/{v}"}
            for v, sec in (("G", 3000.0), ("G+H+U+L", 4200.0))]
    rows[0]["precision"], rows[1]["precision"] = "bfloat16", "float32"
    rows[0]["start"], rows[1]["start"] = "", "0123456789ab"      # the first run recorded no digest
    runs = pd.DataFrame(rows + [{**rows[1], "table": 8, "variant": "AM-MSA"}])   # one run, two tables' rows
    page = tmp_path / "page.md"
    write_evidence(page, evaluate_claims(runs), runs, "regime", (0,), ("synth:A2B",),
                   settings=evidence.SCALES["regime"], recipes={"workbook": (5,)})
    assert "Training time: 2.0 hours of one process for the 2 runs" in page.read_text()
    assert "60 minutes a run on average" in page.read_text()
    assert "Precision of each run's last process" in page.read_text()
    assert ": 1 in bfloat16, 1 in float32." in page.read_text()         # counted once per run folder
    assert ("by the SHA-256 of its weights (`start` in the per-run table): 1 from `0123456789ab`, 1 not recorded."
            in page.read_text())


@pytest.mark.slow
def test_small_scale_study_produces_every_table(small_synth_root, tmp_path, capsys):
    """`muva evidence --scale small` in two shards (one of them with --jobs 2) started at once; the page the last
    one writes equals the page of one process over the same runs; --collect names the runs still missing."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from muva_core.cli import main
    from muva_core.locks import ENV_HELD

    base = {"synth_root": str(small_synth_root), "cache_dir": str(tmp_path / "cache"),
            "reports_dir": str(tmp_path / "reports"), "device": "cpu", "stage1_epochs": 1, "stage2_epochs": 1,
            "lr_milestones": [1]}
    # one protocol and one seed keep CI short (the multi-source path is trained in tests/test_train.py)
    args = ["evidence", "--scale", "small", "--protocol", "synth:A2B", "--seeds", "0", "--quiet"]
    for key, value in base.items():
        args += ["-p", f"{key}={value}"]
    assert main([*args, "--collect"]) == 2        # nothing trained yet: every run named, nothing trained
    err = capsys.readouterr().err
    assert "evidence: 14 of 14 runs not done" in err and err.count("not started") == 14
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    env.pop(ENV_HELD, None)
    # shard 0 with two trainings at once in spawned workers (the --jobs path), shard 1 one at a time
    shards = [subprocess.Popen([sys.executable, "-m", "muva_core.cli", *args, "--shard", shard, *jobs], cwd=root,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for shard, jobs in (("0/2", ["--jobs", "2"]), ("1/2", []))]
    outputs = []
    for proc in shards:
        out, err = proc.communicate(timeout=1800)
        assert proc.returncode == 0, err[-3000:]
        outputs.append(out + err)
    trained = [line for out in outputs for line in out.splitlines() if line.startswith("trained ")]
    assert len(trained) == len(set(trained)) == 14
    assert sum("wrote " in out for out in outputs) >= 1
    out = tmp_path / "reports" / "evidence-small.md"
    by_shards = out.read_text()
    out.unlink()
    # one process over the same runs (nothing left to train): the same page
    out = run_evidence(base, scale="small", protocols=["synth:A2B"], seeds=[0], progress=False, jobs=2)
    text = out.read_text()
    assert text == by_shards
    assert out.name == "evidence-small.md"
    for claim in CLAIMS:
        assert claim.text in text
    for table in TABLES:
        for protocol in ("synth_A2B",):
            # each scale's tables beside the others (the full study's in sweep-table<N>)
            made = tmp_path / "reports" / protocol / f"sweep-table{table}-small" / f"table{table}.md"
            assert made.is_file() and "`muva evidence --scale small --protocol 'synth:A2B' --recipe workbook" in made.read_text()
            assert not (tmp_path / "reports" / protocol / f"sweep-table{table}").exists()
    for table in RECIPE_TABLES["reference"]:   # language and calibration again under the authors' recipe
        assert (tmp_path / "reports" / "synth_A2B" / f"sweep-table{table}-reference-small" / f"table{table}.md").is_file()
    # the full model appears in Tables 5, 6, 8 and 9 but is trained once per seed, protocol and recipe
    runs = sorted((tmp_path / "reports" / "synth_A2B" / "sweep-runs").iterdir())
    # workbook: Table 5's 5 compared rows; Tables 6, 8, 9 add 2, 1 and 1 new configurations;
    # reference: Table 6's 4 rows and Table 9's raw labels
    assert len(runs) == 9 + 5
    import re

    assert re.search(r"\|\s+6 \| language helps the multi-grained model\s+\| reference \| synth:A2B\s+\| mAP", text)
    assert all((r / "metrics" / "train.json").is_file() for r in runs)
    assert "one seed: no verdict" in text
    # diagnostics: pseudo labels raw vs calibrated against the truth, stripes and predicted masks on the target
    assert "### Pseudo labels on the source" in text and "| synth_A " in text and "calibrated" in text
    assert "### Fixed stripes" in text and "### Predicted part masks" in text
    # a reading written by hand beside the page is included on the next run (nothing is retrained)
    out.with_name("evidence-small-notes.md").write_text("The head claim fails because of X.")
    run_evidence(base, scale="small", protocols=["synth:A2B"], seeds=[0], progress=False)
    assert "The head claim fails because of X." in out.read_text()


@pytest.mark.slow
def test_regime_scale_study_writes_its_page(small_synth_root, tmp_path, monkeypatch, capsys):
    """`muva evidence --scale regime --protocol synth:A2B` (docs/evidence.md) at tiny settings: the CLIP its scale
    names made first, the cut variants trained, reports/evidence-regime.md written with what was cut and the CLIP's
    command."""
    from muva_core.cli import main

    import torch

    tiny = {"folder": "clip-wide", "backbone": "tiny", "image_size": (192, 96), "epochs": 1, "scale": "small",
            "color_jitter": True, "seed": 0, "threads": 1, "weights_sha256": "0" * 64}
    monkeypatch.setitem(evidence.SCALES["regime"], "clip", tiny)
    threads = torch.get_num_threads()
    base = {"synth_root": str(small_synth_root), "synth_scale": "small", "data_root": str(tmp_path / "data"),
            "cache_dir": str(tmp_path / "cache"), "reports_dir": str(tmp_path / "reports"), "device": "cpu",
            "backbone": "tiny", "stage1_epochs": 1, "stage2_epochs": 1, "lr_milestones": [1], "batch_size": 16}
    args = ["evidence", "--scale", "regime", "--protocol", "synth:A2B", "--seeds", "0", "--recipe", "workbook",
            "--jobs", "1", "--quiet"]
    for key, value in base.items():
        args += ["-p", f"{key}={value}"]
    assert main(args) == 0
    page = tmp_path / "reports" / "evidence-regime.md"
    assert f"wrote {page}" in capsys.readouterr().out
    text = page.read_text()
    assert "muva evidence --scale regime" in text and "clip-wide --backbone tiny --image-size 192x96" in text
    assert 'variants cut to `{"5": ["G", "G+H+U+L"]}`' in text
    assert "adding the head helps" not in text and "all granularities (G+H+U+L) beat the global token" in text
    runs = list((tmp_path / "reports" / "synth_A2B" / "sweep-runs").iterdir())
    assert len(runs) == 6 and all((r / "metrics" / "train.json").is_file() for r in runs)
    tables = sorted(p.name for p in (tmp_path / "reports" / "synth_A2B").iterdir() if p.name.startswith("sweep-table"))
    assert tables == ["sweep-table5-regime", "sweep-table6-regime", "sweep-table8-regime", "sweep-table9-regime"]
    assert (tmp_path / "data" / "clip-wide" / "clip-tiny-192x96-seed0.safetensors").is_file()
