"""The lock of a run folder (muva_core/locks.py): exclusive across processes and folder names, re-entrant,
inherited by child processes, kept alive by its heartbeat, broken when stale, and a broken holder notices."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from muva_core import locks
from muva_core.locks import LOCK_NAME, LockHeld, LockLost, check_held, hold, read_lock

ROOT = Path(__file__).resolve().parents[1]

HOLDER = """
import sys, time
from pathlib import Path
from muva_core.locks import hold
folder, ready, release, busy = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
with hold(folder):
    ready.write_text("held")
    end = time.time() + busy
    while time.time() < end:      # a slow step that keeps the interpreter busy (the GIL), as an epoch does
        sum(range(10000))
    while not release.exists():
        time.sleep(0.05)
"""


def _start_holder(tmp_path: Path, folder: Path, busy: float = 0.0, timeout: float | None = None,
                  env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    ready, release = tmp_path / "ready", tmp_path / "release"
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    env.pop(locks.ENV_HELD, None)
    if timeout:
        env[locks.ENV_TIMEOUT] = str(timeout)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(ready), str(release), str(busy)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the holder never took the lock"
        time.sleep(0.05)
    return proc, release


def _finish(proc: subprocess.Popen, release: Path) -> str:
    release.write_text("go")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return err


def test_one_holder_across_processes_through_a_symlinked_folder(tmp_path):
    real = tmp_path / "reports" / "run-1"
    real.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "elsewhere" / "same-run"
    link.symlink_to(real)
    proc, release = _start_holder(tmp_path, link)   # the other process knows the folder by another name
    with pytest.raises(LockHeld) as err:
        with hold(real):
            pass
    assert f"pid {proc.pid}" in str(err.value) and str(real) in str(err.value)
    holder, age = read_lock(real)
    assert holder["pid"] == proc.pid and holder["host"] and holder["started"] <= holder["heartbeat"]
    assert age < holder["timeout"]
    _finish(proc, release)
    assert read_lock(real) is None and read_lock(link) is None
    with hold(real, wait=True) as lock:      # free now: taken at once
        assert lock is not None and (real / LOCK_NAME).is_file()
    assert not (real / LOCK_NAME).exists()


def test_waiting_for_a_holder_then_taking_the_lock(tmp_path):
    folder = tmp_path / "run"
    proc, release = _start_holder(tmp_path, folder)
    told = []
    started = time.time()
    subprocess.Popen([sys.executable, "-c", f"import time; time.sleep(2); open({str(release)!r}, 'w').write('go')"])
    with hold(folder, wait=True, on_wait=told.append):
        assert release.exists()          # not before the holder was told to let go
        assert proc.wait(timeout=120) == 0
    assert len(told) == 1 and f"pid {proc.pid}" in str(told[0])
    assert time.time() - started >= 2


def test_reentrant_in_a_process_and_inherited_by_its_children(tmp_path):
    folder = tmp_path / "run"
    child = f"from muva_core.locks import hold\nwith hold({str(folder)!r}) as lock: print(lock)"
    with hold(folder) as outer:
        with hold(folder) as inner:       # the same process again (train_protocol -> each step)
            assert inner is outer
        check_held(folder)
        # a process started now (muva run's notebook kernels) holds it through its parent
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.strip() == "None", proc.stderr
        # a process that did not inherit it does not
        alien = {k: v for k, v in env.items() if k != locks.ENV_HELD}
        proc = subprocess.run([sys.executable, "-c", child], env=alien, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and "LockHeld" in proc.stderr and f"pid {os.getpid()}" in proc.stderr
    assert locks.ENV_HELD not in os.environ


def test_a_folder_made_only_for_the_lock_is_removed_again(tmp_path):
    with hold(tmp_path / "new" / "run"):
        pass
    assert not (tmp_path / "new" / "run").exists()
    with hold(tmp_path / "kept"):
        (tmp_path / "kept" / "config.yaml").write_text("x")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["config.yaml"]


def test_a_stale_lock_is_broken_with_a_message_and_its_old_holder_stops(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "run"
    folder.mkdir()
    dead = {"host": "node-7", "pid": 4242, "started": time.time() - 900, "heartbeat": time.time() - 600,
            "timeout": 60, "command": "muva sweep --table 8", "token": "dead"}
    (folder / LOCK_NAME).write_text(json.dumps(dead))
    old = time.time() - 600
    os.utime(folder / LOCK_NAME, (old, old))
    with hold(folder):
        holder, age = read_lock(folder)
        assert holder["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert f"breaking the stale lock of {folder}: host node-7, pid 4242 (muva sweep --table 8)" in err
    assert "stale after 60 s" in err

    # a holder that was taken for dead (its lock replaced by another process's) notices at its next heartbeat
    monkeypatch.setenv(locks.ENV_TIMEOUT, "600")     # no heartbeat thread interferes with the test
    with hold(folder) as lock:
        (folder / LOCK_NAME).write_text(json.dumps({**dead, "token": "other", "host": "node-8"}))
        lock.heartbeat()
        assert lock.lost
        with pytest.raises(LockLost, match="broken by another process"):
            check_held(folder)
        (folder / LOCK_NAME).unlink()
    assert "now held by host node-8" in capsys.readouterr().err


def test_heartbeat_keeps_a_busy_holder_alive_past_its_timeout(tmp_path):
    """A holder busy for three times its timeout (3 s) is never taken for dead: its heartbeat goes on."""
    folder = tmp_path / "run"
    proc, release = _start_holder(tmp_path, folder, busy=9.0, timeout=3.0)
    deadline = time.time() + 9.0
    ages = []
    while time.time() < deadline:
        with pytest.raises(LockHeld):
            with hold(folder):
                pass
        ages.append(read_lock(folder)[1])
        time.sleep(0.3)
    err = _finish(proc, release)
    assert len(ages) >= 5 and max(ages) < 3.0, ages
    assert "broken" not in err


def test_without_hard_links_the_lock_is_created_exclusively(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    lock = locks.FolderLock(tmp_path)
    assert lock.acquire()
    try:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.token
        with pytest.raises(LockHeld):
            locks.FolderLock(tmp_path).acquire()
    finally:
        lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_bad_timeout_is_named(monkeypatch):
    monkeypatch.setenv(locks.ENV_TIMEOUT, "soon")
    with pytest.raises(ValueError, match="MUVA_LOCK_TIMEOUT='soon': expected a number of seconds"):
        locks.lock_timeout()
    monkeypatch.setenv(locks.ENV_TIMEOUT, "-3")
    with pytest.raises(ValueError, match="positive"):
        locks.lock_timeout()
    monkeypatch.setenv(locks.ENV_TIMEOUT, "42")
    assert locks.lock_timeout() == 42.0 and locks.FolderLock(".").interval == pytest.approx(3.5)
