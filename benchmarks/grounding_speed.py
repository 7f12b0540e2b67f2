"""Images per second of each grounding backend available on this machine, next to the paper's CogVLM.

The paper measures ~7.2 s per image for CogVLM (17B, one A6000). Here, without downloads, each
backend runs as a tiny random-weight model built offline (the builders of tests/tiny_models.py):
the numbers are the pipeline's own overhead (pre/post-processing, generation loop, box parsing)
plus a tiny network, a lower bound on what the real checkpoint costs. Pass --model-dir NAME=PATH
to time a real local checkpoint instead (e.g. florence2=/models/Florence-2-base).

    python benchmarks/grounding_speed.py [--images 16] [--model-dir florence2=/path ...]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

PAPER_COGVLM_S_PER_IMAGE = 7.2


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (256, 128, 3), dtype=np.uint8)) for _ in range(n)]


def _tiny_backends(tmp: Path) -> dict:
    import tiny_models as tm
    from muva_core.grounding import get_backend

    builders = {"florence2": tm.build_florence2, "owlv2": tm.build_owlv2, "grounding_dino": tm.build_grounding_dino,
                "vitpose": tm.build_vitpose}
    out = {}
    for name, build in builders.items():
        try:
            out[f"{name} (tiny random)"] = get_backend(name, model_id=str(build(tmp / name)), device="cpu")
        except Exception as err:  # a backend missing from this transformers version is reported, not fatal
            print(f"{name}: not available here ({type(err).__name__}: {err})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--model-dir", action="append", default=[], metavar="NAME=PATH")
    args = parser.parse_args(argv)
    import torch

    from muva_core.grounding import get_backend

    torch.set_num_threads(max(1, torch.get_num_threads()))
    images = _images(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        backends = _tiny_backends(Path(tmp))
        for item in args.model_dir:
            name, path = item.split("=", 1)
            backends[f"{name} ({path})"] = get_backend(name, model_id=path)
        rows = []
        for label, backend in backends.items():
            backend.ground(images[:1])  # warm-up
            t0 = time.perf_counter()
            step = max(1, backend.batch_size)
            for i in range(0, len(images), step):
                backend.ground(images[i:i + step])
            seconds = time.perf_counter() - t0
            rows.append((label, len(images) / seconds, seconds / len(images)))
    print(f"\n{'backend':36s} {'images/s':>10s} {'s/image':>10s} {'vs CogVLM 7.2 s/img':>20s}")
    print(f"{'CogVLM (paper, A6000)':36s} {1 / PAPER_COGVLM_S_PER_IMAGE:10.3f} {PAPER_COGVLM_S_PER_IMAGE:10.3f} {'1.0x':>20s}")
    for label, ips, spi in rows:
        print(f"{label:36s} {ips:10.2f} {spi:10.4f} {PAPER_COGVLM_S_PER_IMAGE / spi:19.0f}x")
    print("\n(tiny random models measure pipeline overhead, not the real networks' cost; three parts per image)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
