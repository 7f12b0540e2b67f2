"""Part pseudo-labels from a visual grounding expert (paper section 3.2.3)."""
from .base import BACKENDS, PART_PHRASES, GroundingBackend, PartBox, get_backend, register_backend


def available_backends() -> list[str]:
    """Import every backend module (each registers itself) and list the registered names."""
    import importlib

    for mod in ("simulated", "cogvlm", "florence2", "detectors", "pose"):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as err:  # a backend module not written yet, or an optional dependency missing
            if err.name and err.name.startswith(__name__):
                continue
            raise
    return sorted(BACKENDS)


__all__ = ["BACKENDS", "PART_PHRASES", "GroundingBackend", "PartBox", "get_backend", "register_backend", "available_backends"]
