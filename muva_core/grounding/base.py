"""The grounding-backend interface and the part-box record every backend returns.

A backend takes a batch of RGB images and returns, per image, one :class:`PartBox` per part
(head, upper body, legs), in image pixels. Whatever goes wrong for one part (no answer, an
unparseable answer, a box outside the image, inverted coordinates, several boxes) is
recorded in ``status`` and never raises: a labelling run over 100k images must not stop
because one answer was odd.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

from PIL import Image

from ..data.samples import PARTS

PART_PHRASES: dict[str, str] = {
    "head": "the head of the person",
    "upper": "the upper body of the person",
    "legs": "the legs of the person",
}
"""The paper's part phrases (section 3.2.3)."""

# status values recorded per box; several may apply, joined by "+" (e.g. "multiple+clipped")
STATUS_OK = "ok"
STATUS_MISSING = "missing"          # the backend gave no box for this part
STATUS_PARSE_ERROR = "parse_error"  # the answer could not be parsed
STATUS_CLIPPED = "clipped"          # the box reached outside the image and was clipped
STATUS_INVERTED = "inverted"        # x0 > x1 or y0 > y1 and the corners were swapped
STATUS_MULTIPLE = "multiple"        # several boxes were given; one was chosen
STATUS_DEGENERATE = "degenerate"    # zero area after clipping: treated as missing


@dataclass
class PartBox:
    """One part box in image pixels (x0, y0, x1, y1), or ``box=None`` when missing."""

    part: str
    box: tuple[float, float, float, float] | None
    score: float = 1.0
    raw: str = ""
    status: str = STATUS_OK
    candidates: list[tuple[float, float, float, float]] = field(default_factory=list)

    @property
    def missing(self) -> bool:
        return self.box is None


class GroundingBackend(ABC):
    """A visual grounding expert that locates the head, upper body and legs of a person."""

    name: ClassVar[str] = "base"
    batch_size: int = 1

    @abstractmethod
    def ground(
        self, images: Sequence[Image.Image], keys: Sequence[str] | None = None, parts: Sequence[str] = PARTS
    ) -> list[list[PartBox]]:
        """Return, for each image, one :class:`PartBox` per part in ``parts`` order.

        ``keys`` are the images' sample keys (``domain/relpath``); real backends ignore them,
        the simulated expert uses them to look up ground truth.
        """


BACKENDS: dict[str, type[GroundingBackend]] = {}


def register_backend(name: str):
    """Class decorator: make a backend available to ``get_backend(name)`` and ``muva ground --backend``."""

    def deco(cls: type[GroundingBackend]) -> type[GroundingBackend]:
        if name in BACKENDS and BACKENDS[name] is not cls:
            raise ValueError(f"grounding backend {name!r} registered twice")
        cls.name = name
        BACKENDS[name] = cls
        return cls

    return deco


def available_backends() -> list[str]:
    """Import every backend module (each registers itself) and list the registered names."""
    import importlib

    package = __name__.rsplit(".", 1)[0]
    for mod in ("simulated", "cogvlm", "florence2", "detectors", "pose"):
        try:
            importlib.import_module(f"{package}.{mod}")
        except ModuleNotFoundError as err:  # a backend module not written yet, or an optional dependency missing
            if err.name and err.name.startswith(package):
                continue
            raise
    return sorted(BACKENDS)


def get_backend(name: str, **kwargs) -> GroundingBackend:
    """Build the registered backend ``name`` with its keyword arguments."""
    available_backends()  # imports the backend modules so they register
    if name not in BACKENDS:
        raise ValueError(f"unknown grounding backend {name!r}; registered: {sorted(BACKENDS)}")
    return BACKENDS[name](**kwargs)
