"""Work shared between processes through the run folders' locks (docs/cluster.md): sweeps split by `--shard` or
by nothing at all, `--collect`, two `muva run` of one configuration, a killed holder followed by a resumer; and
every command of docs/cluster.md is run by a test or is a template for a cluster that the CLI parses."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from muva_core.cli import build_parser, main
from muva_core.config import resolve_config
from muva_core.locks import ENV_HELD, ENV_TIMEOUT, LOCK_NAME, LockHeld, hold, read_lock
from muva_core.runs import run_folder
from test_readme_commands import _params, tiny

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "cluster.md"

SWEEP = "muva sweep --table 8 --protocol synth:A2B --seeds 0,1,2"
SWEEP_TEST = "tests/test_sweep.py::test_one_process_and_three_sharing_the_sweep_write_the_same_table (--seeds 0,1)"
EVIDENCE_TEST = "tests/test_evidence.py::test_small_scale_study_produces_every_table"
CLUSTER_COMMANDS = {
    f"{SWEEP} --shard 0/2": SWEEP_TEST,
    f"{SWEEP} --shard 1/2": SWEEP_TEST,
    SWEEP: SWEEP_TEST,
    f"{SWEEP} --collect": SWEEP_TEST,
    "muva evidence --scale full --jobs 2": f"{EVIDENCE_TEST} (the same study at --scale small, --jobs 2)",
    "muva evidence --scale full --shard 0/4": f"{EVIDENCE_TEST} (at --scale small, in 2 shards)",
    "muva evidence --scale full --collect": f"{EVIDENCE_TEST} (at --scale small)",
}
"""Each command of docs/cluster.md's runnable blocks -> the test that runs it (with small-scale -p settings)."""


def _blocks() -> list[list[str]]:
    return [block.splitlines() for block in re.findall(r"```bash\n(.*?)```", DOCS.read_text(), re.S)]


def _is_template(block: list[str]) -> bool:
    return any(line.startswith("# template") for line in block[:2])


def test_every_command_of_the_cluster_page_is_run_or_a_template_the_cli_parses():
    commands, templates = [], []
    for block in _blocks():
        if _is_template(block):
            templates.append("\n".join(block))
            continue
        commands += [line.split(" #")[0].strip() for line in block
                     if line.strip() and not line.startswith("#")]
    missing = [c for c in commands if c not in CLUSTER_COMMANDS]
    assert not missing, f"docs/cluster.md commands that no test runs (add them to CLUSTER_COMMANDS): {missing}"
    for where in CLUSTER_COMMANDS.values():
        name = where.split()[0]
        file, test = name.split("::") if "::" in name else ("tests/test_cluster.py", name)
        assert f"def {test}(" in (ROOT / file).read_text(), where
    # the SLURM array, its collecting job, ssh / parallel and torchrun: every muva command in them parses
    assert len(templates) == 4 and "#SBATCH --array=0-3" in templates[0]
    invocations = []
    for text in templates:
        text = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
        text = text.replace("$SLURM_ARRAY_TASK_ID", "0").replace("$i", "0").replace("{}", "0")
        invocations += re.findall(r"(?:\bmuva|muva_core\.cli) +([a-z][^\"\n>&]*)", text)
    assert len(invocations) == 5, invocations
    for args in invocations:
        parsed = build_parser().parse_args(shlex.split(args))
        if getattr(parsed, "shard", None):
            assert re.fullmatch(r"\d/4", parsed.shard)
    readme = (ROOT / "README.md").read_text()
    assert "(docs/cluster.md)" in readme


def test_bad_sharing_options_are_named_before_any_work(tmp_path, capsys, monkeypatch):
    sweep = ["sweep", "--table", "8", "--protocol", "synth:A2B", "-p", f"reports_dir={tmp_path / 'reports'}"]
    assert main([*sweep, "--shard", "2/2"]) == 2
    assert "muva sweep: error: bad shard 2/2: need 0 <= i < n" in capsys.readouterr().err
    assert main(["evidence", "--scale", "small", "--shard", "half"]) == 2
    assert "muva evidence: error: bad shard 'half': expected 'i/n', e.g. '0/4'" in capsys.readouterr().err
    monkeypatch.setenv(ENV_TIMEOUT, "3 minutes")
    assert main([*sweep, "--shard", "0/2"]) == 2
    assert "muva sweep: error: MUVA_LOCK_TIMEOUT='3 minutes': expected a number of seconds" in capsys.readouterr().err
    assert not (tmp_path / "reports").exists()


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}
    env.pop(ENV_HELD, None)
    return env


def _muva(command: str, extra: list[str], **popen) -> subprocess.Popen:
    """``command`` as the page writes it (``muva ...``) plus ``extra``, in its own process."""
    args = shlex.split(command)
    assert args[0] == "muva"
    return subprocess.Popen([sys.executable, "-m", "muva_core.cli", *args[1:], *extra], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **{"env": _env(), **popen})


def _done(proc: subprocess.Popen, timeout: float = 900) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-3000:]}\n{err[-3000:]}"
    return out + err


@pytest.mark.slow
def test_two_muva_run_of_one_configuration_give_one_training(small_synth_root, tmp_path, capsys):
    small = tiny(tmp_path, small_synth_root)
    extra = _params(small) + ["--steps", "05"]
    folder = run_folder(resolve_config("synth:A2B", overrides=small))
    first = _muva("muva run --protocol synth:A2B", extra)
    deadline = time.time() + 600
    while not (folder / LOCK_NAME).exists():          # the first has passed its checks and locked the folder
        assert first.poll() is None, first.communicate()
        assert time.time() < deadline
        time.sleep(0.05)
    # the second, started while the first works: it says who holds the run, and trains nothing
    assert main(["run", "--protocol", "synth:A2B", *extra]) == 2
    out = capsys.readouterr()
    assert f"muva run: error: {folder} is locked by host " in out.err and f"pid {first.pid} " in out.err
    assert "; add --wait to wait for it" in out.err and "running" not in out.out
    # a third with --wait waits for the first (tests/test_locks.py times a wait), then finds every step done
    assert main(["run", "--protocol", "synth:A2B", "--wait", *extra]) == 0
    out = capsys.readouterr()
    assert out.out.count("unchanged since the last run: skipped") == 1 and "running" not in out.out
    text = _done(first, timeout=60)
    # the first ran the notebook: its kernel trained under the runner's lock
    assert "[05_stage2_reid] running" in text and "stage 2 epoch 1/1" in text
    assert len(pd.read_csv(folder / "history_stage2.csv")) == small["stage2_epochs"]
    assert not (folder / LOCK_NAME).exists()


STUCK_AFTER_FIRST_EPOCH = """
import sys, time
from pathlib import Path
from muva_core.train import run, stage2
busy, signals = float(sys.argv[1]), Path(sys.argv[2])
real_rebuild, real_save = stage2.rebuild_memory, run.save_checkpoint

def slow_rebuild(*args, **kwargs):        # a slow step in stage 2's first epoch, busy (the GIL held)
    (signals / "slow").write_text("slow")
    end = time.time() + busy
    while time.time() < end:
        sum(range(10000))
    (signals / "slow-done").write_text("done")
    return real_rebuild(*args, **kwargs)

def save_then_hang(path, *args, **kwargs):  # after the first stage-2 checkpoint: hang until killed
    real_save(path, *args, **kwargs)
    if Path(path).name == "stage2-last.safetensors":
        (signals / "saved").write_text("saved")
        time.sleep(3600)

stage2.rebuild_memory, run.save_checkpoint = slow_rebuild, save_then_hang
from muva_core.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 600) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_killed_holder_is_followed_by_one_that_breaks_its_stale_lock_and_resumes(small_synth_root, tmp_path):
    timeout = 3.0
    small = tiny(tmp_path, small_synth_root, stage2_epochs=3, lr_milestones=[2])
    args = ["train", "--protocol", "synth:A2B", *_params(small)]
    folder = run_folder(resolve_config("synth:A2B", overrides=small))
    signals = tmp_path / "signals"
    signals.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", STUCK_AFTER_FIRST_EPOCH, "9", str(signals), *args], cwd=ROOT,
                              env=_env(**{ENV_TIMEOUT: str(timeout)}), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        # the heartbeat goes on through a step three times longer than the timeout: nobody may take the run
        _wait_for(signals / "slow", holder)
        ages = []
        while not (signals / "slow-done").exists():
            with pytest.raises(LockHeld):
                with hold(folder):
                    pass
            ages.append(read_lock(folder)[1])
            time.sleep(0.3)
        assert len(ages) >= 10 and max(ages) < timeout, ages
        _wait_for(signals / "saved", holder)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=60)
    assert len(pd.read_csv(folder / "history_stage2.csv")) == 1
    with pytest.raises(LockHeld, match=f"pid {holder.pid} "):     # dead, but not stale yet
        with hold(folder):
            pass
    # the next one (its own timeout is the default; the dead holder's lock says 3 s) breaks it and resumes
    resumer = subprocess.Popen([sys.executable, "-m", "muva_core.cli", *args, "--wait"], cwd=ROOT, env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    text = _done(resumer)
    broke = re.search(rf"breaking the stale lock of {re.escape(str(folder))}: host \S+, pid {holder.pid} .*"
                      rf"last heartbeat (\d+) s ago \(stale after 3 s\)", text)
    assert broke and int(broke.group(1)) >= timeout, text[-3000:]
    assert "resuming stage 2 from epoch 1" in text and "stage 2 epoch 1/3" not in text
    assert list(pd.read_csv(folder / "history_stage2.csv")["epoch"]) == [1, 2, 3]
    record = json.loads((folder / "metrics" / "train.json").read_text())
    assert record["trained_by"]["pid"] == resumer.pid and record["metrics"]["mAP"] > 0
    assert not (folder / LOCK_NAME).exists()
