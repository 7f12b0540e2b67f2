"""CPU inference speed of the exported MUVA encoder: ONNX Runtime against PyTorch eager.

Exports ``inference_features`` (random weights; speed does not depend on them) with
:func:`muva_core.export.export_onnx`, checks parity on the timing batch, then times both,
interleaved (torch, ORT, torch, ORT, ...), same thread count. Prints export time, file size,
max abs difference, median ms per batch and images per second.

    .venv/bin/python benchmarks/onnx_speed.py                          # small config, batch 8
    .venv/bin/python benchmarks/onnx_speed.py --config vit-b-16 --batch 16 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from muva_core.export import check_onnx_parity, export_onnx, onnx_session, run_onnx
from muva_core.model import BackboneConfig, MUVAConfig, MUVAEncoder, build_clip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="small", choices=["tiny", "small", "vit-b-16"])
    ap.add_argument("--parts", default="G+H+U+L", help="granularity code, e.g. G or G+H+U+L")
    ap.add_argument("--mask-mode", default="predicted", choices=["predicted", "stripe"])
    ap.add_argument("--exporter", default="torchscript", choices=["torchscript", "dynamo"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    clip, _ = build_clip(BackboneConfig(name=args.config, pretrained=None))
    enc = MUVAEncoder(clip.visual, MUVAConfig(parts=args.parts, mask_mode=args.mask_mode)).eval()
    images = torch.randn(args.batch, 3, 256, 128, generator=torch.Generator().manual_seed(0))

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = export_onnx(enc, Path(tmp) / "muva.onnx", exporter=args.exporter)
        export_s = time.perf_counter() - t0
        size_mb = path.stat().st_size / 2**20
        sess = onnx_session(path, num_threads=args.threads)
        diff = check_onnx_parity(enc, path, images, atol=None, session=sess)

        run_onnx(sess, images)                       # warm-up
        with torch.no_grad():
            enc.inference_features(images)
        times: dict[str, list[float]] = {"pytorch": [], "onnxruntime": []}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            with torch.no_grad():
                enc.inference_features(images)
            times["pytorch"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run_onnx(sess, images)
            times["onnxruntime"].append(time.perf_counter() - t0)

    print(f"config {args.config}, parts {args.parts}, masks {args.mask_mode}, batch {args.batch}, "
          f"threads {args.threads}, exporter {args.exporter}")
    print(f"export {export_s:.1f} s, file {size_mb:.1f} MiB, feature dim {enc.feat_dim}, max |diff| {diff:.2e}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:12s} {med * 1e3:8.1f} ms/batch  {args.batch / med:8.1f} img/s  (min {min(ts) * 1e3:.1f} ms)")
    ratio = statistics.median(times["pytorch"]) / statistics.median(times["onnxruntime"])
    print(f"onnxruntime speed-up over pytorch eager: {ratio:.2f}x")


if __name__ == "__main__":
    main()
