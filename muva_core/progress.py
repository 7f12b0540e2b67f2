"""Progress lines of long work (epochs, resumes, phases) that reach the user wherever the work runs.

In a terminal (``muva train``) and in a notebook a line is printed beside the progress bars. Under
``muva run`` / ``muva demo`` the notebook's kernel is a separate process whose output only lands in
the executed notebook, so the runner sets ``MUVA_PROGRESS_FILE`` to ``<run folder>/progress.log``:
each line is appended there as well, and :class:`ProgressTail` prints the new lines in the runner's
terminal while the notebook runs. The file stays in the run folder as the run's log.
"""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Mapping

ENV = "MUVA_PROGRESS_FILE"


def report(message: str, echo: bool = True) -> None:
    """One progress line: printed when ``echo`` (through tqdm, so bars stay intact) and appended to the
    progress file when one is set."""
    if echo:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stdout)
    path = os.environ.get(ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(message.rstrip("\n") + "\n")


def epoch_line(stage: str, epoch: int, epochs: int, row: Mapping[str, float]) -> str:
    """``stage 2 epoch 3/16: loss 2.314 (id 1.200, imp 0.610, ...), mask_iou_head 0.41, lr 3.0e-04, 13.2 s``
    (under float16 + GradScaler also ``loss scale 32768, 1 step skipped (float16 overflow)``)."""
    losses = {k[5:]: v for k, v in row.items() if k.startswith("loss_")}
    total = losses.pop("total", None)
    if total is None and len(losses) == 1:
        total = losses.popitem()[1]
    head = f"loss {total:.3f}" if total is not None else ""
    if losses:
        head += " (" + ", ".join(f"{k} {v:.3f}" for k, v in losses.items()) + ")"
    fields = [head] if head else []
    fields += [f"{k} {row[k]:.2f}" for k in row if k.startswith(("mask_iou_", "text_to_centroid"))]
    if "lr" in row:
        fields.append(f"lr {row['lr']:.1e}")
    if "grad_scale" in row:  # float16 + GradScaler: overflowed steps are skipped, and counted
        n = int(row.get("overflow_skipped", 0))
        fields.append(f"loss scale {row['grad_scale']:g}, {n} step{'s' if n != 1 else ''} skipped (float16 overflow)")
    fields.append(f"{row.get('seconds', 0.0):.1f} s")
    return f"{stage} epoch {epoch}/{epochs}: " + ", ".join(fields)


class ProgressTail:
    """While open, print every line appended to ``path`` with ``prefix`` (a background thread)."""

    def __init__(self, path: str | os.PathLike, prefix: str = "", interval: float = 0.5, stream=None) -> None:
        self.path = Path(path)
        self.prefix = prefix
        self.interval = interval
        self.stream = stream or sys.stdout
        self._stop = threading.Event()
        self._offset = self.path.stat().st_size if self.path.is_file() else 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "ProgressTail":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()

    def _drain(self) -> None:
        """Print the complete new lines (and, once stopped, a last unterminated one)."""
        if not self.path.is_file():
            return
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        if not self._stop.is_set():
            chunk = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(chunk)
        for line in chunk.decode("utf-8", errors="replace").splitlines():
            if line.strip():
                print(f"{self.prefix}{line}", file=self.stream, flush=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._drain()
