"""Florence-2 phrase grounding as a grounding expert (native transformers implementation).

Task ``<CAPTION_TO_PHRASE_GROUNDING>`` with the part phrase as caption; the answer holds
``<loc_k>`` tokens (bins of 1000 per side). Boxes come from the processor's post-processor
(``post_process_generation``) when it yields any, else from our own
:func:`parse_florence_locations`. Default checkpoint ``florence-community/Florence-2-base``
(the native-format conversion loaded by ``Florence2ForConditionalGeneration``; the original
``microsoft/Florence-2-*`` repositories need remote code). Needs transformers >= 4.56.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from PIL import Image

from ..data.samples import PARTS
from .base import PART_PHRASES, STATUS_MISSING, STATUS_PARSE_ERROR, GroundingBackend, PartBox, register_backend
from .boxes import choose_box, load_hf_model, missing_box, parse_florence_locations, resolve_device

if TYPE_CHECKING:
    import torch

FLORENCE2_MODEL_ID = "florence-community/Florence-2-base"
TASK = "<CAPTION_TO_PHRASE_GROUNDING>"



def load_florence2(model_id: str = FLORENCE2_MODEL_ID, device: str | None = None, dtype: "torch.dtype | None" = None):
    """Load the Florence-2 model and processor from a Hub id or a local directory."""
    import torch

    try:
        from transformers import AutoProcessor, Florence2ForConditionalGeneration
    except ImportError as err:
        raise ImportError("the florence2 backend needs transformers >= 4.56 (Florence2ForConditionalGeneration)") from err
    device = resolve_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return load_hf_model("Florence-2", Florence2ForConditionalGeneration, AutoProcessor, model_id, device, dtype)


@register_backend("florence2")
class Florence2Backend(GroundingBackend):
    """Florence-2 ``<CAPTION_TO_PHRASE_GROUNDING>`` per part, batched over images.

    ``model`` / ``processor`` can be injected; otherwise they are loaded from ``model_id``.
    Several boxes in one answer are resolved with :func:`choose_box` rule ``multi_box``
    (default: the largest, as the answer carries no scores).
    """

    def __init__(
        self,
        model: Any = None,
        processor: Any = None,
        *,
        model_id: str = FLORENCE2_MODEL_ID,
        device: str | None = None,
        dtype: "torch.dtype | None" = None,
        max_new_tokens: int = 64,
        num_beams: int = 1,
        batch_size: int = 8,
        use_post_processor: bool = True,
        multi_box: str = "score",
    ) -> None:
        if model is None or processor is None:
            model, processor = load_florence2(model_id, device=device, dtype=dtype)
        self.model = model
        self.processor = processor
        self.max_new_tokens = int(max_new_tokens)
        self.num_beams = int(num_beams)
        self.batch_size = max(1, int(batch_size))
        self.use_post_processor = use_post_processor
        self.multi_box = multi_box

    @classmethod
    def from_pretrained(
        cls, model_id_or_path: str = FLORENCE2_MODEL_ID, device: str | None = None, dtype: "torch.dtype | None" = None, **kwargs: Any
    ) -> "Florence2Backend":
        model, processor = load_florence2(model_id_or_path, device=device, dtype=dtype)
        return cls(model=model, processor=processor, **kwargs)

    def _device_dtype(self) -> tuple["torch.device", "torch.dtype"]:
        param = next(iter(self.model.parameters()))
        return param.device, param.dtype

    def generate(self, images: Sequence[Image.Image], phrase: str) -> list[str]:
        """Run the grounding task for one phrase on a batch of images; return the raw answers."""
        import torch

        device, dtype = self._device_dtype()
        prompts = [TASK + phrase] * len(images)
        inputs = self.processor(text=prompts, images=list(images), return_tensors="pt", padding=True)
        inputs = {k: (v.to(device=device, dtype=dtype) if k == "pixel_values" else v.to(device)) for k, v in inputs.items()}
        with torch.no_grad():
            out = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=False
            )
        return list(self.processor.batch_decode(out, skip_special_tokens=False))

    def parse_answer(self, part: str, text: str, img_w: int, img_h: int) -> PartBox:
        """Boxes of one answer -> :class:`PartBox` (never raises)."""
        raw = text or ""
        candidates: list = []
        if self.use_post_processor and hasattr(self.processor, "post_process_generation"):
            try:
                parsed = self.processor.post_process_generation(text=raw, task=TASK, image_size=(img_w, img_h))
                candidates = [tuple(float(v) for v in b) for b in parsed[TASK]["bboxes"]]
            except Exception:  # noqa: BLE001 - a malformed answer must not stop a labelling run
                candidates = []
        if not candidates:
            candidates = parse_florence_locations(raw, img_w, img_h)
        if not candidates:
            stripped = raw.replace("<s>", "").replace("</s>", "").replace("<pad>", "").strip()
            return missing_box(part, raw=raw, status=STATUS_PARSE_ERROR if stripped else STATUS_MISSING)
        return choose_box(part, candidates, img_w, img_h, raw=raw, rule=self.multi_box)

    def ground(
        self, images: Sequence[Image.Image], keys: Sequence[str] | None = None, parts: Sequence[str] = PARTS
    ) -> list[list[PartBox]]:
        for part in parts:
            if part not in PART_PHRASES:
                raise ValueError(f"unknown part {part!r}; known parts: {list(PART_PHRASES)}")
        rgb = [im.convert("RGB") for im in images]
        results: list[list[PartBox]] = [[] for _ in rgb]
        for start in range(0, len(rgb), self.batch_size):
            chunk = rgb[start : start + self.batch_size]
            for part in parts:
                answers = self.generate(chunk, PART_PHRASES[part])
                for offset, (image, text) in enumerate(zip(chunk, answers)):
                    w, h = image.size
                    results[start + offset].append(self.parse_answer(part, text, w, h))
        return results


__all__ = ["FLORENCE2_MODEL_ID", "TASK", "Florence2Backend", "load_florence2", "parse_florence_locations"]
