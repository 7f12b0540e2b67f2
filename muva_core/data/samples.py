"""The sample record shared by every dataset parser, and the dataset errors."""
from __future__ import annotations

from dataclasses import dataclass

PARTS: tuple[str, ...] = ("head", "upper", "legs")
"""The three local granularities of MUVA, in the order used everywhere (masks, tokens, boxes)."""


class DatasetError(ValueError):
    """Bad dataset input. The message always names the offending path and what is wrong."""


@dataclass(frozen=True)
class Sample:
    """One image of a Re-ID split.

    path:    absolute path of the image file
    pid:     identity label (train: relabelled 0..N-1; query/gallery: original id, 0 = distractor)
    camid:   camera index, 0-based
    domain:  dataset name (e.g. ``market1501``, ``synth_A``); with ``relpath`` it is the unique key
    relpath: path relative to the dataset root, POSIX separators (``bounding_box_train/0002_c1s1_000451_03.jpg``)
    """

    path: str
    pid: int
    camid: int
    domain: str
    relpath: str

    @property
    def key(self) -> str:
        """Unique key across datasets: ``domain/relpath`` (basenames collide across datasets)."""
        return f"{self.domain}/{self.relpath}"
