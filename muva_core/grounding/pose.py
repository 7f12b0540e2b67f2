"""Part boxes from human pose: ViTPose keypoints turned into head / upper-body / legs boxes.

Re-ID images are person crops, so the person box given to ViTPose is the whole image by
default (a ``person_box`` callable can supply another). ViTPose
(``usyd-community/vitpose-base-simple``) predicts the 17 COCO keypoints, and
:func:`keypoints_to_part_boxes` converts them:

- head: nose, eyes and ears (at least two, or one plus both shoulders for the scale); the
  box is widened by ``margin`` x head size and extended upwards to the top of the head
  (eyes sit about half-way up the head) and down to the chin;
- upper body: from the shoulders (minus a small margin) down to the hips; x from the
  shoulders, elbows and wrists (+ margin);
- legs: from the hips down to the ankles (+ margin for the feet; without ankles the lower
  leg is extrapolated from the knees); x from hips, knees and ankles (+ margin).

A part whose keypoints are missing or below ``min_score`` falls back to its stripe window
(:func:`stripe_box`) with status ``fallback``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from PIL import Image

from ..data.samples import PARTS
from .base import GroundingBackend, PartBox, register_backend
from .boxes import STATUS_FALLBACK, join_status, load_hf_model, sanitize_box, stripe_box

if TYPE_CHECKING:
    import torch

VITPOSE_MODEL_ID = "usyd-community/vitpose-base-simple"

COCO_KEYPOINTS: tuple[str, ...] = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
)  # fmt: skip
KP = {name: i for i, name in enumerate(COCO_KEYPOINTS)}
HEAD_KPS = ("nose", "left_eye", "right_eye", "left_ear", "right_ear")
SHOULDERS = ("left_shoulder", "right_shoulder")
ARMS = ("left_elbow", "right_elbow", "left_wrist", "right_wrist")
HIPS = ("left_hip", "right_hip")
KNEES = ("left_knee", "right_knee")
ANKLES = ("left_ankle", "right_ankle")



def keypoints_to_part_boxes(
    kpts: Any,
    scores: Any,
    img_w: float,
    img_h: float,
    min_score: float = 0.3,
    parts: Sequence[str] = PARTS,
    margin: float = 0.1,
) -> list[PartBox]:
    """Convert 17 COCO keypoints (pixels, ``[17, 2]``) with confidences (``[17]``) to part boxes.

    Pure function; see the module docstring for the rules. Each box is clipped to the image
    (status ``clipped``); a part lacking confident keypoints, or whose box degenerates, gets
    its stripe window with status ``fallback``. ``score`` is the mean confidence of the
    keypoints used (0 for a fallback); ``raw`` names them.
    """
    k = np.asarray(kpts, dtype=np.float64).reshape(-1, 2)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if k.shape[0] != len(COCO_KEYPOINTS) or s.shape[0] != len(COCO_KEYPOINTS):
        raise ValueError(f"expected {len(COCO_KEYPOINTS)} COCO keypoints and scores, got {k.shape} and {s.shape}")
    ok = (s >= min_score) & np.isfinite(k).all(axis=1) & np.isfinite(s)

    def pts(names: Sequence[str]) -> np.ndarray:
        idx = [KP[n] for n in names if ok[KP[n]]]
        return k[idx] if idx else np.zeros((0, 2))

    def used(*groups: Sequence[str]) -> list[str]:
        return [n for g in groups for n in g if ok[KP[n]]]

    def conf(names: list[str]) -> float:
        return float(np.mean([s[KP[n]] for n in names])) if names else 0.0

    shoulders, arms, hips, knees, ankles, head = (pts(g) for g in (SHOULDERS, ARMS, HIPS, KNEES, ANKLES, HEAD_KPS))
    shoulder_w = float(np.ptp(shoulders[:, 0])) if len(shoulders) == 2 else 0.0

    def head_box() -> tuple[tuple[float, float, float, float] | None, list[str]]:
        names = used(HEAD_KPS)
        if len(head) == 0 or (len(head) < 2 and shoulder_w <= 0):
            return None, names
        x0, y0 = head.min(axis=0)
        x1, y1 = head.max(axis=0)
        size = max(x1 - x0, y1 - y0, 0.5 * shoulder_w)
        if size <= 0:
            return None, names
        cx = 0.5 * (x0 + x1)
        half_w = 0.5 * max(x1 - x0, 0.6 * size) + margin * size
        return (cx - half_w, y0 - 0.8 * size, cx + half_w, y1 + 0.6 * size), names

    def upper_box() -> tuple[tuple[float, float, float, float] | None, list[str]]:
        names = used(SHOULDERS, ARMS, HIPS)
        if len(shoulders) == 0 or len(hips) == 0:
            return None, names
        top, bottom = float(shoulders[:, 1].min()), float(hips[:, 1].max())
        height = bottom - top
        if height <= 0:
            return None, names
        xs = np.concatenate([shoulders[:, 0], arms[:, 0] if len(arms) else np.zeros(0), hips[:, 0]])
        width = max(float(np.ptp(xs)), 1e-9)
        return (float(xs.min()) - margin * width, top - margin * height, float(xs.max()) + margin * width, bottom), names

    def legs_box() -> tuple[tuple[float, float, float, float] | None, list[str]]:
        names = used(HIPS, KNEES, ANKLES)
        if len(hips) == 0 or (len(knees) == 0 and len(ankles) == 0):
            return None, names
        top = float(hips[:, 1].min())
        if len(ankles):
            bottom = float(ankles[:, 1].max())
        else:  # no ankles: lower leg about as long as the thigh
            bottom = float(knees[:, 1].max()) + (float(knees[:, 1].max()) - top)
        height = bottom - top
        if height <= 0:
            return None, names
        xs = np.concatenate([g[:, 0] for g in (hips, knees, ankles) if len(g)])
        width = max(float(np.ptp(xs)), 1e-9)
        return (float(xs.min()) - margin * width, top, float(xs.max()) + margin * width, bottom + margin * height), names

    builders: dict[str, Callable[[], tuple[Any, list[str]]]] = {"head": head_box, "upper": upper_box, "legs": legs_box}
    out: list[PartBox] = []
    for part in parts:
        if part not in builders:
            raise ValueError(f"unknown part {part!r}; known parts: {list(builders)}")
        box, names = builders[part]()
        raw = ",".join(names)
        if box is not None:
            clean, status = sanitize_box(box, img_w, img_h)
            if clean is not None:
                out.append(PartBox(part=part, box=clean, score=conf(names), raw=raw, status=status))
                continue
        out.append(
            PartBox(part=part, box=stripe_box(part, img_w, img_h), score=0.0, raw=raw, status=join_status(STATUS_FALLBACK))
        )
    return out


def load_vitpose(model_id: str = VITPOSE_MODEL_ID, device: str | None = None, dtype: "torch.dtype | None" = None):
    """Load the ViTPose model and image processor from a Hub id or a local directory."""
    try:
        from transformers import VitPoseForPoseEstimation, VitPoseImageProcessor
    except ImportError as err:
        raise ImportError("the vitpose backend needs transformers >= 4.48 (VitPoseForPoseEstimation)") from err
    return load_hf_model("ViTPose", VitPoseForPoseEstimation, VitPoseImageProcessor, model_id, device, dtype)


@register_backend("vitpose")
class ViTPoseBackend(GroundingBackend):
    """ViTPose keypoints -> part boxes, batched over images.

    ``person_box(image) -> (x, y, w, h)`` gives the person box (COCO format); by default the
    whole image, since Re-ID images are person crops.
    """

    def __init__(
        self,
        model: Any = None,
        processor: Any = None,
        *,
        model_id: str = VITPOSE_MODEL_ID,
        device: str | None = None,
        dtype: "torch.dtype | None" = None,
        min_score: float = 0.3,
        margin: float = 0.1,
        batch_size: int = 32,
        person_box: Callable[[Image.Image], Sequence[float]] | None = None,
    ) -> None:
        if model is None or processor is None:
            model, processor = load_vitpose(model_id, device=device, dtype=dtype)
        self.model = model
        self.processor = processor
        self.min_score = float(min_score)
        self.margin = float(margin)
        self.batch_size = max(1, int(batch_size))
        self.person_box = person_box

    @classmethod
    def from_pretrained(
        cls, model_id_or_path: str = VITPOSE_MODEL_ID, device: str | None = None, dtype: "torch.dtype | None" = None, **kwargs: Any
    ) -> "ViTPoseBackend":
        model, processor = load_vitpose(model_id_or_path, device=device, dtype=dtype)
        return cls(model=model, processor=processor, **kwargs)

    def keypoints(self, images: Sequence[Image.Image]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per image: keypoints ``[17, 2]`` (pixels) and scores ``[17]`` for its person box."""
        import torch

        boxes = [[list(self.person_box(im)) if self.person_box else [0.0, 0.0, float(im.width), float(im.height)]] for im in images]
        inputs = self.processor(list(images), boxes=boxes, return_tensors="pt")
        param = next(iter(self.model.parameters()))
        kwargs: dict[str, Any] = {"pixel_values": inputs["pixel_values"].to(device=param.device, dtype=param.dtype)}
        backbone_cfg = getattr(getattr(self.model, "config", None), "backbone_config", None)
        if getattr(backbone_cfg, "num_experts", 1) > 1:  # ViTPose++ (MoE): 0 selects the COCO head
            kwargs["dataset_index"] = torch.zeros(len(images), dtype=torch.long, device=param.device)
        with torch.no_grad():
            outputs = self.model(**kwargs)
        outputs.heatmaps = outputs.heatmaps.float()
        results = self.processor.post_process_pose_estimation(outputs, boxes=boxes)
        return [(r[0]["keypoints"].cpu().numpy(), r[0]["scores"].cpu().numpy()) for r in results]

    def ground(
        self, images: Sequence[Image.Image], keys: Sequence[str] | None = None, parts: Sequence[str] = PARTS
    ) -> list[list[PartBox]]:
        rgb = [im.convert("RGB") for im in images]
        results: list[list[PartBox]] = []
        for start in range(0, len(rgb), self.batch_size):
            chunk = rgb[start : start + self.batch_size]
            for image, (kpts, scores) in zip(chunk, self.keypoints(chunk)):
                results.append(
                    keypoints_to_part_boxes(
                        kpts, scores, image.width, image.height, min_score=self.min_score, parts=parts, margin=self.margin
                    )
                )
        return results


__all__ = ["COCO_KEYPOINTS", "VITPOSE_MODEL_ID", "ViTPoseBackend", "keypoints_to_part_boxes", "load_vitpose"]
