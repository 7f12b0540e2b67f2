"""Zero-shot open-vocabulary detectors as grounding experts: OWLv2 and Grounding DINO.

The part phrases (:data:`PART_PHRASES`) are the text queries. For each image and part the
highest-scoring predicted box is kept if its score reaches ``score_threshold``; the other
boxes above the threshold that survive non-maximum suppression are recorded as candidates
(status ``multiple``). Box coordinates come from the processor's post-processor
(``post_process_grounded_object_detection``), the per-part scores from the logits:

- OWLv2 (``google/owlv2-base-patch16-ensemble``): one logit per (box, query); score =
  sigmoid of the part's logit.
- Grounding DINO (``IDEA-Research/grounding-dino-tiny``): the phrases are joined into one
  caption ``"the head of the person. the upper body of the person. ..."``; a box's score
  for a part is the highest token probability over the part's tokens.
"""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from PIL import Image

from ..data.samples import PARTS
from .base import PART_PHRASES, GroundingBackend, PartBox, register_backend
from .boxes import choose_box, load_hf_model, missing_box

if TYPE_CHECKING:
    import torch

OWLV2_MODEL_ID = "google/owlv2-base-patch16-ensemble"
GROUNDING_DINO_MODEL_ID = "IDEA-Research/grounding-dino-tiny"



def _check_parts(parts: Sequence[str]) -> None:
    for part in parts:
        if part not in PART_PHRASES:
            raise ValueError(f"unknown part {part!r}; known parts: {list(PART_PHRASES)}")


class ZeroShotDetectorBackend(GroundingBackend):
    """Shared plumbing of the detector backends: loading, batching, per-part box choice.

    Subclasses implement :meth:`detect`, returning per image and part the candidate boxes
    (pixels) and their scores for that part.
    """

    default_model_id: ClassVar[str] = ""
    model_class_name: ClassVar[str] = ""
    processor_class_name: ClassVar[str] = ""

    def __init__(
        self,
        model: Any = None,
        processor: Any = None,
        *,
        model_id: str | None = None,
        device: str | None = None,
        dtype: "torch.dtype | None" = None,
        score_threshold: float = 0.1,
        nms_iou: float = 0.5,
        max_candidates: int = 5,
        batch_size: int = 8,
    ) -> None:
        if model is None or processor is None:
            model, processor = self.load(model_id or self.default_model_id, device=device, dtype=dtype)
        self.model = model
        self.processor = processor
        self.score_threshold = float(score_threshold)
        self.nms_iou = float(nms_iou)
        self.max_candidates = max(1, int(max_candidates))
        self.batch_size = max(1, int(batch_size))

    @classmethod
    def load(cls, model_id: str, device: str | None = None, dtype: "torch.dtype | None" = None) -> tuple[Any, Any]:
        """Load model and processor from a Hub id or a local directory (float32 unless ``dtype``)."""
        import transformers

        try:
            model_cls = getattr(transformers, cls.model_class_name)
            proc_cls = getattr(transformers, cls.processor_class_name)
        except AttributeError as err:
            raise ImportError(
                f"the {cls.name} backend needs {cls.model_class_name}, missing from transformers {transformers.__version__}"
            ) from err
        return load_hf_model(cls.name, model_cls, proc_cls, model_id, device, dtype)

    @classmethod
    def from_pretrained(
        cls, model_id_or_path: str | None = None, device: str | None = None, dtype: "torch.dtype | None" = None, **kwargs: Any
    ) -> "ZeroShotDetectorBackend":
        model, processor = cls.load(model_id_or_path or cls.default_model_id, device=device, dtype=dtype)
        return cls(model=model, processor=processor, **kwargs)

    def _device_dtype(self) -> tuple["torch.device", "torch.dtype"]:
        param = next(iter(self.model.parameters()))
        return param.device, param.dtype

    def _to_model(self, inputs: Any) -> dict[str, Any]:
        device, dtype = self._device_dtype()
        return {
            k: (v.to(device=device, dtype=dtype) if k == "pixel_values" else v.to(device))
            for k, v in inputs.items()
            if hasattr(v, "to")
        }

    def detect(self, images: list[Image.Image], parts: Sequence[str]) -> list[dict[str, tuple["torch.Tensor", "torch.Tensor"]]]:
        """Per image: ``{part: (boxes [N, 4] pixels, scores [N])}`` over all predicted boxes."""
        raise NotImplementedError

    def select(self, part: str, boxes: "torch.Tensor", scores: "torch.Tensor", img_w: int, img_h: int) -> PartBox:
        """Highest-score box for ``part`` if it reaches the threshold; NMS survivors as candidates."""
        import torch
        from torchvision.ops import nms

        if scores.numel() == 0:
            return missing_box(part, raw="no predictions")
        boxes, scores = boxes.float().cpu(), scores.float().cpu()
        best = float(scores.max())
        raw = f"best score {best:.3f}"
        if best < self.score_threshold:
            return missing_box(part, raw=f"{raw} < threshold {self.score_threshold}", score=best)
        keep = scores >= self.score_threshold
        boxes, scores = boxes[keep], scores[keep]
        # NMS needs well-ordered corners; inverted boxes are fixed (and flagged) by choose_box
        ordered = torch.stack(
            [torch.minimum(boxes[:, 0], boxes[:, 2]), torch.minimum(boxes[:, 1], boxes[:, 3]),
             torch.maximum(boxes[:, 0], boxes[:, 2]), torch.maximum(boxes[:, 1], boxes[:, 3])], dim=1
        )
        order = nms(ordered, scores, self.nms_iou)[: self.max_candidates]
        return choose_box(part, boxes[order].tolist(), img_w, img_h, scores=scores[order].tolist(), raw=raw)

    def ground(
        self, images: Sequence[Image.Image], keys: Sequence[str] | None = None, parts: Sequence[str] = PARTS
    ) -> list[list[PartBox]]:
        _check_parts(parts)
        rgb = [im.convert("RGB") for im in images]
        results: list[list[PartBox]] = []
        for start in range(0, len(rgb), self.batch_size):
            chunk = rgb[start : start + self.batch_size]
            for image, per_part in zip(chunk, self.detect(chunk, parts)):
                w, h = image.size
                results.append([self.select(p, *per_part[p], w, h) for p in parts])
        return results


def _post_process(processor: Any, outputs: Any, target_sizes: list[tuple[int, int]], **kwargs: Any) -> list[dict]:
    """``post_process_grounded_object_detection`` keeping every box (no score threshold).

    Handles the renaming of ``box_threshold`` to ``threshold`` across transformers versions.
    """
    fn = getattr(processor, "post_process_grounded_object_detection", None)
    if fn is None:  # older OWLv2 processors
        fn = processor.post_process_object_detection
    params = inspect.signature(fn).parameters
    key = "threshold" if "threshold" in params else "box_threshold"
    return fn(outputs, target_sizes=target_sizes, **{key: float("-inf")}, **kwargs)


@register_backend("owlv2")
class Owlv2Backend(ZeroShotDetectorBackend):
    """OWLv2 open-vocabulary detection with the part phrases as text queries."""

    default_model_id = OWLV2_MODEL_ID
    model_class_name = "Owlv2ForObjectDetection"
    processor_class_name = "Owlv2Processor"

    def detect(self, images: list[Image.Image], parts: Sequence[str]) -> list[dict[str, tuple["torch.Tensor", "torch.Tensor"]]]:
        import torch

        phrases = [PART_PHRASES[p] for p in parts]
        inputs = self.processor(text=[phrases] * len(images), images=images, return_tensors="pt")
        with torch.no_grad():
            outputs = self.model(**self._to_model(inputs))
        sizes = [(im.height, im.width) for im in images]  # OWLv2 pads to a square: boxes scale by max side
        processed = _post_process(self.processor, outputs, sizes)
        probs = outputs.logits.float().sigmoid().cpu()  # [B, num_boxes, num_queries]
        out = []
        for i, res in enumerate(processed):
            boxes = res["boxes"].float().cpu()
            out.append({p: (boxes, probs[i, :, j]) for j, p in enumerate(parts)})
        return out


@register_backend("grounding_dino")
class GroundingDinoBackend(ZeroShotDetectorBackend):
    """Grounding DINO with the part phrases joined into one caption (one forward per batch)."""

    default_model_id = GROUNDING_DINO_MODEL_ID
    model_class_name = "GroundingDinoForObjectDetection"
    processor_class_name = "GroundingDinoProcessor"

    def caption(self, parts: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
        """The caption ``"phrase. phrase. phrase."`` and each phrase's character span in it."""
        text, spans = "", []
        for p in parts:
            phrase = PART_PHRASES[p].strip().lower()
            if text:
                text += " "
            spans.append((len(text), len(text) + len(phrase)))
            text += phrase + "."
        return text, spans

    def token_spans(self, text: str, spans: list[tuple[int, int]]) -> list[list[int]]:
        """Token positions of each character span (special tokens excluded)."""
        enc = self.processor.tokenizer(text, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        out = []
        for lo, hi in spans:
            out.append([t for t, (a, b) in enumerate(offsets) if b > a and a < hi and b > lo])
        return out

    def detect(self, images: list[Image.Image], parts: Sequence[str]) -> list[dict[str, tuple["torch.Tensor", "torch.Tensor"]]]:
        import torch

        text, spans = self.caption(parts)
        token_sets = self.token_spans(text, spans)
        inputs = self.processor(images=images, text=[text] * len(images), return_tensors="pt")
        with torch.no_grad():
            outputs = self.model(**self._to_model(inputs))
        sizes = [(im.height, im.width) for im in images]
        # text_threshold above 1: no token labels decoded (we score tokens ourselves)
        processed = _post_process(self.processor, outputs, sizes, input_ids=inputs["input_ids"], text_threshold=1.01)
        probs = outputs.logits.float().sigmoid().cpu()  # [B, num_queries, max_text_len]
        out = []
        for i, res in enumerate(processed):
            boxes = res["boxes"].float().cpu()
            per_part = {}
            for p, toks in zip(parts, token_sets):
                toks = [t for t in toks if t < probs.shape[-1]]
                scores = probs[i][:, toks].max(dim=-1).values if toks else torch.zeros(boxes.shape[0])
                per_part[p] = (boxes, scores)
            out.append(per_part)
        return out


__all__ = [
    "GROUNDING_DINO_MODEL_ID",
    "OWLV2_MODEL_ID",
    "GroundingDinoBackend",
    "Owlv2Backend",
    "ZeroShotDetectorBackend",
]
