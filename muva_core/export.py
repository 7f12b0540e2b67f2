"""Deployment export of the MUVA image encoder to ONNX, and an ONNX Runtime parity check.

The exported graph is :meth:`MUVAEncoder.inference_features`: images ``[B, 3, H, W]``
(RGB, already normalised with ``(x / 255 - mean) / std``; mean/std are in the metadata) ->
the BN-neck feature, L2-normalised by default, ``[B, (1+P) E]`` (2048-d for ViT-B/16). The
per-image AM-MSA masks are part of the graph: the RMP logits of every layer are gated with
``Sigmoid -> Greater`` and scattered into the boolean attention mask (``ScatterND``), which
the attention uses as ``Where(mask, 0, -inf) + Softmax``; the model code exports unchanged.

Exporters (``exporter=``):

* ``"torchscript"`` (default): torch's TorchScript-tracing exporter (``dynamo=False``). Needs
  only ``onnx`` (to write the metadata), exports the tiny encoder in < 1 s, and traces the
  batch dimension as a dynamic axis. torch >= 2.9 marks it deprecated (the DeprecationWarning
  and the TracerWarnings about the encoder's shape checks, which are constant for a fixed
  image size, are silenced here); torch is pinned to 2.14.1 where it works.
* ``"dynamo"``: the torch.export-based exporter (torch's default). Also exact, but needs
  ``onnxscript`` (+ ``onnx_ir``) and is ~10x slower to export; opset >= 18.

ONNX metadata (``metadata_props``; ONNX Runtime: ``session.get_modelmeta().custom_metadata_map``),
all strings, JSON where structured: ``muva_export_version``, ``model_config`` (MUVAConfig),
``backbone`` (width, layers, heads, patch size, grid, embed dim), ``image_size`` ([H, W]),
``mean``, ``std``, ``norm``, ``feature_dim``, ``normalized``, ``granularities``, ``input``,
``output``, ``exporter``, ``opset``, ``torch_version`` and any ``extra_metadata``.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from muva_core.data.transforms import NORMALIZATIONS
from muva_core.io import atomic_path
from muva_core.model.muva import MUVAEncoder
from muva_core.train.checkpoint import unwrap_model

__all__ = [
    "EXPORTERS",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "OnnxParityError",
    "InferenceFeatures",
    "export_onnx",
    "read_onnx_metadata",
    "onnx_session",
    "run_onnx",
    "check_onnx_parity",
]

EXPORTERS: tuple[str, ...] = ("torchscript", "dynamo")
INPUT_NAME, OUTPUT_NAME, BATCH_AXIS = "images", "features", "batch"
EXPORT_VERSION = "1"
_EXAMPLE_BATCH = 2          # traced batch size when the batch axis is dynamic (1 could be specialised)
_DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}


class OnnxParityError(RuntimeError):
    """The ONNX model's features differ from PyTorch's by more than the tolerance."""


def _require(module: str, purpose: str) -> Any:
    """Import an optional dependency or fail with an ImportError that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{purpose} needs the '{module}' package, which is not installed: "
            f"pip install {module}  (it is in muva-workbook's 'dev' extra)"
        ) from exc


class InferenceFeatures(nn.Module):
    """``forward(images) = encoder.inference_features(images, normalize)`` (the deployment feature)."""

    def __init__(self, encoder: MUVAEncoder, normalize: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.normalize = bool(normalize)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.inference_features(images, normalize=self.normalize)


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each one's own flag afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in flags:
            m.training = training


def _check_encoder(encoder: nn.Module) -> MUVAEncoder:
    enc = unwrap_model(encoder)
    if not isinstance(enc, MUVAEncoder):
        raise TypeError(f"export needs a MUVAEncoder, got {type(enc).__name__}")
    if enc.n_parts and enc.cfg.mask_mode == "pseudo":
        raise ValueError(
            "this encoder's mask_mode is 'pseudo' (part masks given as an input), which has no "
            "image-only deployment graph; export a 'predicted' or 'stripe' encoder"
        )
    return enc


def _metadata(
    enc: MUVAEncoder,
    image_size: tuple[int, int],
    norm: str,
    normalize: bool,
    exporter: str,
    opset: int,
    batch_size: int | None,
    extra: Mapping[str, Any] | None,
) -> dict[str, str]:
    mean, std = NORMALIZATIONS[norm]
    v = enc.visual
    blocks = v.transformer.resblocks
    backbone = {
        "width": enc.width,
        "layers": len(blocks),
        "heads": blocks[0].attn.num_heads,
        "patch_size": list(v.conv1.kernel_size),
        "grid": list(enc.grid),
        "embed_dim": enc.embed_dim,
    }
    batch = BATCH_AXIS if batch_size is None else batch_size
    meta = {
        "muva_export_version": EXPORT_VERSION,
        "model_config": json.dumps(dataclasses.asdict(enc.cfg)),
        "backbone": json.dumps(backbone),
        "image_size": json.dumps(list(image_size)),
        "mean": json.dumps(list(mean)),
        "std": json.dumps(list(std)),
        "norm": norm,
        "feature_dim": str(enc.feat_dim),
        "normalized": json.dumps(bool(normalize)),
        "granularities": json.dumps(list(enc.cfg.granularities)),
        "input": f"{INPUT_NAME}: float32 [{batch}, 3, {image_size[0]}, {image_size[1]}], RGB, (x / 255 - mean) / std",
        "output": f"{OUTPUT_NAME}: float32 [{batch}, {enc.feat_dim}], BN-neck feature"
        + (", L2-normalised" if normalize else ""),
        "exporter": exporter,
        "opset": str(opset),
        "torch_version": torch.__version__,
    }
    for key, value in (extra or {}).items():
        if key in meta:
            raise ValueError(f"extra_metadata key {key!r} clashes with a built-in metadata key")
        meta[str(key)] = value if isinstance(value, str) else json.dumps(value)
    return meta


def _torch_export(
    wrapper: nn.Module,
    example: torch.Tensor,
    tmp: Path,
    exporter: str,
    opset: int,
    dynamic: bool,
) -> None:
    common = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset)
    if exporter == "dynamo":
        _require("onnxscript", "export_onnx(exporter='dynamo')")
        dyn = {INPUT_NAME: {0: torch.export.Dim(BATCH_AXIS, min=1)}} if dynamic else None
        torch.onnx.export(
            wrapper, (example,), str(tmp), dynamo=True, dynamic_shapes=dyn,
            external_data=False, optimize=True, verbose=False, **common,
        )
        return
    dyn_axes = {INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}} if dynamic else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(
            wrapper, (example,), str(tmp), dynamo=False, dynamic_axes=dyn_axes,
            do_constant_folding=True, **common,
        )


def _fix_output_shape(model: Any, feature_dim: int, batch_size: int | None) -> None:
    """Name the output's dims like the input's (the tracer leaves the feature dim symbolic)."""
    dims = model.graph.output[0].type.tensor_type.shape.dim
    if len(dims) != 2:
        raise RuntimeError(f"exported output has rank {len(dims)}, expected [batch, feature_dim]")
    if batch_size is None:
        dims[0].dim_param = BATCH_AXIS
    else:
        dims[0].dim_value = batch_size
    dims[1].dim_value = feature_dim


def export_onnx(
    encoder: nn.Module,
    path: str | os.PathLike,
    image_size: tuple[int, int] = (256, 128),
    batch_size: int | None = None,
    opset: int | None = None,
    normalize: bool = True,
    exporter: str = "torchscript",
    norm: str = "clip",
    extra_metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Export ``encoder.inference_features`` (eval mode) to an ONNX file at ``path``; return the path.

    image_size: (H, W) of the input; must be the encoder's own (the positional grid is fixed).
    batch_size: fixed batch size, or None for a dynamic batch axis named ``batch``.
    opset:      ONNX opset; None = 17 (torchscript) / 18 (dynamo).
    normalize:  L2-normalise the output feature (the test-time feature of the paper).
    exporter:   ``torchscript`` (needs ``onnx`` only) or ``dynamo`` (also ``onnxscript``); see module doc.
    norm:       the input normalisation recorded in the metadata (a key of ``NORMALIZATIONS``).
    extra_metadata: more metadata_props (e.g. backbone name, checkpoint); non-strings as JSON.

    The file is written atomically (a failed export leaves ``path`` as it was). The
    encoder's train/eval flags are restored afterwards; its weights are not touched.
    """
    onnx = _require("onnx", "export_onnx")
    enc = _check_encoder(encoder)
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if norm not in NORMALIZATIONS:
        raise ValueError(f"norm must be one of {sorted(NORMALIZATIONS)}, got {norm!r}")
    image_size = tuple(int(s) for s in image_size)  # type: ignore[assignment]
    if len(image_size) != 2 or image_size != tuple(enc.visual.image_size):
        raise ValueError(
            f"image_size {image_size} does not match the encoder's input size {tuple(enc.visual.image_size)} "
            "(the positional grid is fixed at build time)"
        )
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None (dynamic), got {batch_size}")
    opset = _DEFAULT_OPSET[exporter] if opset is None else int(opset)
    if exporter == "dynamo" and opset < 18:
        raise ValueError(f"the dynamo exporter needs opset >= 18, got {opset}")
    meta = _metadata(enc, image_size, norm, normalize, exporter, opset, batch_size, extra_metadata)

    device = enc.visual.conv1.weight.device
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(batch_size or _EXAMPLE_BATCH, 3, *image_size, generator=gen).to(device)
    wrapper = InferenceFeatures(enc, normalize)
    path = Path(path)
    with _eval_mode(wrapper), atomic_path(path) as tmp:
        _torch_export(wrapper, example, tmp, exporter, opset, dynamic=batch_size is None)
        model = onnx.load(str(tmp))
        _fix_output_shape(model, enc.feat_dim, batch_size)
        onnx.helper.set_model_props(model, meta)
        model.doc_string = "MUVA image encoder (inference_features): " + meta["output"]
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp))
    return path


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata_props of an exported file, JSON values decoded (plain strings kept)."""
    onnx = _require("onnx", "read_onnx_metadata")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    model = onnx.load(str(path), load_external_data=False)
    out: dict[str, Any] = {}
    for prop in model.metadata_props:
        try:
            out[prop.key] = json.loads(prop.value)
        except ValueError:
            out[prop.key] = prop.value
    return out


def onnx_session(
    path: str | os.PathLike,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    num_threads: int | None = None,
) -> Any:
    """An ``onnxruntime.InferenceSession`` for ``path`` (CPU by default)."""
    ort = _require("onnxruntime", "running an exported ONNX model")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    opts = ort.SessionOptions()
    if num_threads is not None:
        opts.intra_op_num_threads = int(num_threads)
    return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))


def run_onnx(session_or_path: Any, images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Features ``[B, feature_dim]`` of ``images [B, 3, H, W]`` from an ONNX session (or a file path)."""
    sess = onnx_session(session_or_path) if isinstance(session_or_path, (str, os.PathLike)) else session_or_path
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().float().numpy()
    images = np.ascontiguousarray(images, dtype=np.float32)
    (out,) = sess.run([OUTPUT_NAME], {INPUT_NAME: images})
    return out


def check_onnx_parity(
    encoder: nn.Module,
    path: str | os.PathLike,
    images: torch.Tensor,
    atol: float | None = 1e-4,
    session: Any = None,
) -> float:
    """Max absolute difference between ONNX Runtime (CPU) and PyTorch features on ``images``.

    The PyTorch side is ``encoder.inference_features`` in eval mode (flags restored), with the
    normalisation recorded in the file's metadata. Raises :class:`OnnxParityError` when the
    difference exceeds ``atol`` (None = only report), or is not finite, or the shapes differ.
    """
    sess = session if session is not None else onnx_session(path)
    enc = _check_encoder(encoder)
    normalize = read_onnx_metadata(path).get("normalized", True)
    got = run_onnx(sess, images)
    with _eval_mode(enc), torch.no_grad():
        device = enc.visual.conv1.weight.device
        ref = enc.inference_features(images.to(device), normalize=bool(normalize)).float().cpu().numpy()
    if got.shape != ref.shape:
        raise OnnxParityError(f"{path}: ONNX output shape {got.shape} != PyTorch {ref.shape}")
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    max_diff = float(diff.max()) if diff.size else 0.0
    if not (np.isfinite(got).all() and np.isfinite(ref).all()):
        max_diff = float("inf")
    if atol is not None and not max_diff <= atol:
        raise OnnxParityError(
            f"{path}: ONNX Runtime and PyTorch features differ by {max_diff:.3g} > atol {atol:g} "
            f"(batch {len(ref)}, feature dim {ref.shape[-1]})"
        )
    return max_diff
