"""One lock per folder (a run folder, or the shared data cache), safe on NFS / Lustre and across machines.

A process that writes a run holds the lock of its folder: the file ``<folder>/.muva-lock``, created
atomically by ``link()``-ing a fully written temporary file onto that name (the classic NFS-safe lock; where
the file system has no hard links, ``O_CREAT|O_EXCL``). It holds JSON: host, pid, start time, the command,
the heartbeat and the holder's timeout. While the lock is held, a background thread rewrites it every
``timeout / 12`` seconds (the heartbeat). A lock whose file was last written more than its holder's
timeout ago is *stale*: the holder died (SIGKILL, a node failure) and the next process breaks it with a
message and carries on (a run resumes from its last finished epoch). The age is measured on the file
system's own clock (the modification time of a file written just now beside it), so machines whose clocks
disagree still agree on it. The timeout is ``$MUVA_LOCK_TIMEOUT`` seconds (default 180).

A second process that meets a live lock either waits for it (``wait=True``) or gets :class:`LockHeld`,
whose message names the folder and the holder. Locks are re-entrant within a process (keyed by the
folder's device and inode, so a folder reached through a symlink is the same folder), and a child process
started while its parent holds a lock (the notebook kernels of ``muva run``) holds it too: the tokens of the
locks a process holds are in ``$MUVA_LOCKS_HELD``, which children inherit. A holder whose lock was broken
(it was taken for dead) notices at its next heartbeat; :func:`check_held` then raises :class:`LockLost`
before it writes again.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

LOCK_NAME = ".muva-lock"
"""The lock file inside the locked folder."""

ENV_TIMEOUT = "MUVA_LOCK_TIMEOUT"
"""Seconds without a heartbeat after which a lock is stale (default :data:`DEFAULT_TIMEOUT`)."""

ENV_HELD = "MUVA_LOCKS_HELD"
"""Tokens of the locks this process (or its parent) holds, separated by ``,``; children inherit them."""

DEFAULT_TIMEOUT = 180.0

_NO_LINK = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}


class LockHeld(RuntimeError):
    """Another live process holds the lock; the message names the folder and the holder."""

    def __init__(self, folder: Path, holder: dict, age: float | None = None) -> None:
        self.folder, self.holder, self.age = Path(folder), holder, age
        super().__init__(f"{self.folder} is locked by {describe(holder, age)}")


class LockLost(RuntimeError):
    """This process's lock was broken by another process (it was taken for dead); it must stop writing."""


def lock_timeout() -> float:
    """``$MUVA_LOCK_TIMEOUT`` (seconds), else :data:`DEFAULT_TIMEOUT`."""
    text = os.environ.get(ENV_TIMEOUT, "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{ENV_TIMEOUT}={text!r}: expected a number of seconds") from None
    if value <= 0:
        raise ValueError(f"{ENV_TIMEOUT}={text!r}: expected a positive number of seconds")
    return value


def describe(holder: dict, age: float | None = None) -> str:
    """``host h, pid 12 (muva sweep ...), since 2026-01-01 10:00:00 UTC, last heartbeat 4 s ago``."""
    if not holder:
        return "an unreadable lock"
    text = f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}"
    if holder.get("command"):
        text += f" ({holder['command']})"
    if holder.get("started"):
        text += f", since {_stamp(holder['started'])}"
    if age is not None:
        text += f", last heartbeat {age:.0f} s ago (stale after {float(holder.get('timeout', 0)):.0f} s)"
    return text


def _stamp(seconds: float) -> str:
    return datetime.fromtimestamp(float(seconds), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _inherited() -> set[str]:
    return {t for t in os.environ.get(ENV_HELD, "").split(",") if t}


def _set_inherited(tokens: set[str]) -> None:
    if tokens:
        os.environ[ENV_HELD] = ",".join(sorted(tokens))
    else:
        os.environ.pop(ENV_HELD, None)


def _command() -> str:
    """This process's command line, shortened (``python -m pkg.mod`` shows as ``pkg.mod``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    program = spec.name.removesuffix(".__main__") if spec is not None and spec.name else \
        os.path.basename(sys.argv[0] or "python")
    text = " ".join([program, *sys.argv[1:]])
    return text if len(text) <= 100 else text[:97] + "..."


def read_lock(folder: str | os.PathLike) -> tuple[dict, float] | None:
    """The holder recorded in ``folder``'s lock and the seconds since its last heartbeat (on the file
    system's clock), or None when the folder is not locked."""
    folder = Path(folder)
    found = _read(folder / LOCK_NAME)
    if found is None:
        return None
    holder, mtime = found
    return holder, max(0.0, _fs_now(folder) - mtime)


def is_stale(holder: dict, age: float) -> bool:
    """No heartbeat for longer than the holder's own timeout (or this process's, when it recorded none)."""
    return age > float(holder.get("timeout") or lock_timeout())


def _read(path: Path) -> tuple[dict, float] | None:
    """``(content, mtime)`` of a lock file (opened first: on NFS the open revalidates the cached attributes)."""
    try:
        with open(path, "rb") as f:
            mtime = os.fstat(f.fileno()).st_mtime
            raw = f.read()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(raw.decode())
        if not isinstance(holder, dict):
            raise ValueError
    except ValueError:
        holder = {}  # being written (O_EXCL fallback) or damaged: judged by its age alone
    return holder, mtime


def _fs_now(folder: Path) -> float:
    """The file system's clock: the modification time of a file written now in ``folder``."""
    probe = folder / f"{LOCK_NAME}.now-{uuid.uuid4().hex}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except OSError:
        return time.time()
    try:
        os.write(fd, b"now")
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def _folder_key(folder: Path) -> tuple[int, int]:
    st = os.stat(folder)
    return st.st_dev, st.st_ino


class FolderLock:
    """The lock of one folder, held by this process (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike, timeout: float | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.timeout = float(timeout) if timeout else lock_timeout()
        self.interval = max(0.05, self.timeout / 12)
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._made_folder = False

    # ---- content ------------------------------------------------------------------------------
    def _content(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": self.started,
                           "heartbeat": time.time(), "timeout": self.timeout, "command": _command(),
                           "token": self.token}, indent=1).encode()

    def _write_new(self, path: Path) -> None:
        """Create ``path`` (``O_CREAT|O_EXCL``: :class:`FileExistsError` when it exists) holding the lock's content."""
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, self._content())
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_temp(self) -> Path:
        tmp = self.folder / f"{LOCK_NAME}.{self.token}.{uuid.uuid4().hex[:8]}.tmp"
        self._write_new(tmp)
        return tmp

    # ---- acquiring ----------------------------------------------------------------------------
    def _try_once(self) -> tuple[dict, float] | str:
        """One attempt: ``"ours"`` when the lock is now ours, ``"parent"`` when it is a lock our parent process
        holds (``$MUVA_LOCKS_HELD``), else ``(holder, age)`` of the live lock in the way. A stale lock is broken
        (with a message) and the attempt repeated."""
        while True:
            if not self.folder.is_dir():
                self.folder.mkdir(parents=True, exist_ok=True)
                self._made_folder = True
            try:
                tmp = self._write_temp()
            except FileNotFoundError:  # the folder was removed meanwhile (an empty folder's last holder left)
                continue
            try:
                try:
                    os.link(tmp, self.path)
                    return "ours"
                except FileExistsError:
                    pass
                except OSError as err:
                    if os.stat(tmp).st_nlink == 2:  # NFS: the link was made, its reply was lost
                        return "ours"
                    if err.errno not in _NO_LINK:
                        raise
                    if self._create_exclusive():
                        return "ours"
                now = os.stat(tmp).st_mtime
            finally:
                tmp.unlink(missing_ok=True)
            found = _read(self.path)
            if found is None:
                continue  # released meanwhile: try again
            holder, mtime = found
            age = max(0.0, now - mtime)
            if holder.get("token") and holder["token"] in _inherited():
                return "parent"
            if not is_stale(holder, age):
                return holder, age
            if _remove_if(self.path, holder.get("token"), aside=f"{LOCK_NAME}.stale-{self.token}"):
                print(f"breaking the stale lock of {self.folder}: {describe(holder, age)}; its holder is taken "
                      "for dead and the work goes on here", file=sys.stderr, flush=True)

    def _create_exclusive(self) -> bool:
        """``O_CREAT|O_EXCL`` where the file system has no hard links."""
        try:
            self._write_new(self.path)
        except FileExistsError:
            return False
        return True

    def acquire(self, wait: bool = False, poll: float | None = None, on_wait=None) -> bool:
        """Take the lock and start its heartbeat; False (and no heartbeat) when it is our parent process's lock.
        A live holder raises :class:`LockHeld`, or with ``wait`` is waited for (``on_wait(err)`` is called once,
        when the wait begins)."""
        poll = poll if poll is not None else min(2.0, max(0.05, self.interval))
        told = False
        while True:
            got = self._try_once()
            if got == "parent":
                return False
            if got == "ours":
                break
            err = LockHeld(self.folder, *got)
            if not wait:
                raise err
            if not told and on_wait is not None:
                on_wait(err)
                told = True
            time.sleep(poll)
        self._thread = threading.Thread(target=self._beat, name=f"muva-lock-heartbeat {self.folder.name}",
                                        daemon=True)
        self._thread.start()
        return True

    # ---- holding -------------------------------------------------------------------------------
    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.heartbeat()
            except OSError as err:  # a hiccup of the file system: try again at the next beat
                print(f"lock heartbeat of {self.folder} failed ({err}); retrying", file=sys.stderr, flush=True)
            if self.lost:
                return

    def heartbeat(self) -> None:
        """Rewrite the lock (a new heartbeat), unless another process has taken it: then :attr:`lost`."""
        found = _read(self.path)
        if found is None or found[0].get("token") != self.token:
            self.lost = True
            who = describe(found[0]) if found else "nobody"
            print(f"the lock of {self.folder} was broken (it is now held by {who}): this process stops writing "
                  "there", file=sys.stderr, flush=True)
            return
        tmp = self._write_temp()
        try:
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.lost:
            _remove_if(self.path, self.token, aside=f"{LOCK_NAME}.released-{self.token}")
        if self._made_folder:
            try:
                self.folder.rmdir()  # a folder made only to hold the lock goes again (nothing was written)
            except OSError:
                pass


def _remove_if(path: Path, token: str | None, aside: str) -> bool:
    """Remove the lock file at ``path`` if it still holds ``token``: renamed aside first (atomic, so of two
    processes removing the same lock only one succeeds), checked, then deleted; a lock that turns out to be
    another one (taken meanwhile) is linked back. True when the lock with ``token`` was removed."""
    moved = path.with_name(aside)
    try:
        os.rename(path, moved)
    except FileNotFoundError:
        return False
    found = _read(moved)
    if token is not None and (found is None or found[0].get("token") != token):
        try:
            os.link(moved, path)
        except OSError:
            pass
        moved.unlink(missing_ok=True)
        return False
    moved.unlink(missing_ok=True)
    return True


# ---- the process's locks ----------------------------------------------------------------------------
_HELD: dict[tuple[int, int], list] = {}
_GUARD = threading.RLock()


@contextmanager
def hold(folder: str | os.PathLike, wait: bool = False, timeout: float | None = None,
         on_wait=None) -> Iterator[FolderLock | None]:
    """Hold ``folder``'s lock for the ``with`` block (re-entrant in this process).

    ``wait=False``: a live lock of another process raises :class:`LockHeld`; ``wait=True`` waits until it is
    released or stale; ``on_wait(err)`` is told once when a wait begins (default: a line on stderr). The folder
    is made when missing, and removed again at the end if nothing was written into it. Yields the
    :class:`FolderLock` (None when the lock is held by a parent process)."""
    folder = Path(folder)
    made = not folder.is_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with _GUARD:
        entry = _HELD.get(_folder_key(folder))
        if entry is not None:
            entry[1] += 1
    if entry is not None:
        try:
            yield entry[0]
        finally:
            with _GUARD:
                entry[1] -= 1
        return
    lock = FolderLock(folder, timeout)
    lock._made_folder = made
    if on_wait is None:
        def on_wait(err):
            print(f"waiting: {err}", file=sys.stderr, flush=True)
    if not lock.acquire(wait=wait, on_wait=on_wait):
        yield None
        return
    key = _folder_key(folder)  # after acquiring: a folder removed and made again meanwhile has a new inode
    with _GUARD:
        _HELD[key] = [lock, 1]
        _set_inherited(_inherited() | {lock.token})
    try:
        yield lock
    finally:
        with _GUARD:
            _HELD.pop(key, None)
            _set_inherited(_inherited() - {lock.token})
        lock.release()


def check_held(folder: str | os.PathLike) -> None:
    """Raise :class:`LockLost` when this process held ``folder``'s lock and another process has broken it."""
    try:
        key = _folder_key(Path(folder))
    except FileNotFoundError:
        return
    with _GUARD:
        entry = _HELD.get(key)
    if entry is not None and entry[0].lost:
        raise LockLost(f"the lock of {folder} was broken by another process (this one was taken for dead after "
                       f"{entry[0].timeout:.0f} s without a heartbeat): stopped before writing there again")


def shared_data(cfg):
    """The lock that lets one process at a time make what runs share (the synthetic set, the pseudo labels and
    masks, the image scan, the pretrained CLIP): the lock of ``cache_dir``, waited for."""
    from .paths import resolve

    return hold(resolve(cfg.grounding.cache_dir), wait=True)
