"""Part pseudo-labels from a visual grounding expert (paper section 3.2.3)."""
from .base import (BACKENDS, PART_PHRASES, GroundingBackend, PartBox, available_backends, get_backend,
                   register_backend)

__all__ = ["BACKENDS", "PART_PHRASES", "GroundingBackend", "PartBox", "get_backend", "register_backend", "available_backends"]
