"""The paper's visual grounding expert: CogVLM grounding (section 3.2.3).

Model ``THUDM/cogvlm-grounding-generalist-hf`` (17B, remote code) with the
``lmsys/vicuna-7b-v1.5`` tokenizer. For each part the expert is asked

    "Guide me to the location of <p> within the image by providing its bounding boxes."

with ``<p>`` from :data:`PART_PHRASES`, using the ``base`` template and greedy decoding; the
answer holds ``[[x0,y0,x1,y1]]`` boxes in relative x1000 coordinates, parsed by
:func:`parse_cogvlm_boxes`.

The model ships its own modelling code, which only works with transformers 4.35-4.41 (newer
versions break its generation), so it runs in a separate conda environment described by
``environment-cogvlm.yml`` at the repository root. Loading it executes code downloaded from
the Hub, hence the explicit ``trust_remote_code=True`` opt-in. ``model`` and ``tokenizer`` can
be injected (tests use a fake model returning canned answers).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from PIL import Image

from ..data.samples import PARTS
from .base import PART_PHRASES, STATUS_MISSING, STATUS_PARSE_ERROR, GroundingBackend, PartBox, register_backend
from .boxes import check_model_path, choose_box, missing_box, parse_cogvlm_boxes, rel1000_to_pixels, resolve_device

if TYPE_CHECKING:
    import torch

COGVLM_MODEL_ID = "THUDM/cogvlm-grounding-generalist-hf"
COGVLM_TOKENIZER_ID = "lmsys/vicuna-7b-v1.5"
QUERY_TEMPLATE = "Guide me to the location of {phrase} within the image by providing its bounding boxes."
"""The paper's grounding instruction Q^p."""
TRANSFORMERS_RANGE = ((4, 35), (4, 41))
"""Inclusive (major, minor) range of transformers versions the CogVLM remote code works with."""
ENV_FILE = "environment-cogvlm.yml"


class CogVLMSetupError(RuntimeError):
    """CogVLM cannot be loaded in this environment; the message says why and what to do."""


def cogvlm_query(part: str) -> str:
    """The paper's instruction for ``part`` (``head``, ``upper`` or ``legs``)."""
    if part not in PART_PHRASES:
        raise ValueError(f"unknown part {part!r}; known parts: {list(PART_PHRASES)}")
    return QUERY_TEMPLATE.format(phrase=PART_PHRASES[part])


def _parse_version(version: str) -> tuple[int, int]:
    pieces = version.split(".")
    try:
        return int(pieces[0]), int("".join(ch for ch in pieces[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def check_transformers_version(version: str | None = None) -> str:
    """Raise :class:`CogVLMSetupError` unless transformers is within 4.35-4.41; return the version."""
    if version is None:
        try:
            import transformers
        except ImportError as err:  # pragma: no cover - transformers is a core dependency
            raise CogVLMSetupError(
                f"transformers is not installed; create the CogVLM environment from {ENV_FILE}"
            ) from err
        version = transformers.__version__
    lo, hi = TRANSFORMERS_RANGE
    if not lo <= _parse_version(version) <= hi:
        raise CogVLMSetupError(
            f"CogVLM's remote code needs transformers {lo[0]}.{lo[1]}-{hi[0]}.{hi[1]}.x, but transformers "
            f"{version} is installed (newer versions break its generation). Run the CogVLM backend in its own "
            f"conda environment: `conda env create -f {ENV_FILE} && conda activate muva-cogvlm && "
            f"pip install -e . --no-deps`, or use a natively supported backend (florence2, owlv2, grounding_dino, vitpose)."
        )
    return version


def load_cogvlm(
    model_id: str = COGVLM_MODEL_ID,
    tokenizer_id: str = COGVLM_TOKENIZER_ID,
    *,
    trust_remote_code: bool = False,
    device: str | None = None,
    load_in_4bit: bool = False,
    dtype: "torch.dtype | None" = None,
) -> tuple[Any, Any]:
    """Load the CogVLM grounding model and its tokenizer (``model_id`` may be a local path).

    bf16 on GPU (float32 on CPU, impractically slow), or 4-bit with bitsandbytes
    (``load_in_4bit=True``, ~11 GB instead of ~35 GB).
    """
    if not trust_remote_code:
        raise CogVLMSetupError(
            f"{model_id} is loaded with its own modelling code downloaded from the Hugging Face Hub, which "
            "runs arbitrary Python on this machine. Review it, then opt in explicitly with "
            "`CogVLMBackend(trust_remote_code=True)` or `get_backend('cogvlm', trust_remote_code=True)`."
        )
    check_transformers_version()
    import torch
    from transformers import AutoModelForCausalLM, LlamaTokenizer

    device = resolve_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    kwargs: dict[str, Any] = dict(torch_dtype=dtype, low_cpu_mem_usage=True, trust_remote_code=True)
    if load_in_4bit:
        if not device.startswith("cuda"):
            raise CogVLMSetupError("4-bit loading (bitsandbytes) needs a CUDA device")
        try:
            from transformers import BitsAndBytesConfig
        except ImportError as err:  # pragma: no cover
            raise CogVLMSetupError(f"4-bit loading needs bitsandbytes; see {ENV_FILE}") from err
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": "cuda:0" if device == "cuda" else device}
    model_id, tokenizer_id = check_model_path(model_id), check_model_path(tokenizer_id)
    try:
        tokenizer = LlamaTokenizer.from_pretrained(tokenizer_id)
        model = AutoModelForCausalLM.from_pretrained(model_id, **kwargs)
    except OSError as err:
        raise CogVLMSetupError(
            f"could not load {model_id} / {tokenizer_id}: {err}. Download them first (or pass local paths); "
            "with HF_HUB_OFFLINE=1 only cached files are used."
        ) from err
    if not load_in_4bit:
        model = model.to(device)
    return model.eval(), tokenizer



@register_backend("cogvlm")
class CogVLMBackend(GroundingBackend):
    """CogVLM grounding expert; one generation per image and part (greedy, ``base`` template).

    Pass ``model`` and ``tokenizer`` to use already-loaded (or fake) objects; otherwise the
    model is loaded from ``model_id`` / ``tokenizer_id``, which requires
    ``trust_remote_code=True``. ``multi_box`` is the :func:`choose_box` rule applied when an
    answer holds several boxes (default: the largest).
    """

    batch_size = 1

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        *,
        model_id: str = COGVLM_MODEL_ID,
        tokenizer_id: str = COGVLM_TOKENIZER_ID,
        device: str | None = None,
        trust_remote_code: bool = False,
        load_in_4bit: bool = False,
        dtype: "torch.dtype | None" = None,
        max_new_tokens: int = 64,
        template_version: str = "base",
        multi_box: str = "score",
    ) -> None:
        if model is None or tokenizer is None:
            model, tokenizer = load_cogvlm(
                model_id,
                tokenizer_id,
                trust_remote_code=trust_remote_code,
                device=device,
                load_in_4bit=load_in_4bit,
                dtype=dtype,
            )
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.max_new_tokens = int(max_new_tokens)
        self.template_version = template_version
        self.multi_box = multi_box

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str = COGVLM_MODEL_ID,
        tokenizer_id_or_path: str = COGVLM_TOKENIZER_ID,
        **kwargs: Any,
    ) -> "CogVLMBackend":
        """Load from Hub ids or local paths (``trust_remote_code=True`` is still required)."""
        return cls(model_id=model_id_or_path, tokenizer_id=tokenizer_id_or_path, **kwargs)

    # ------------------------------------------------------------------ model plumbing
    def _model_device_dtype(self) -> tuple["torch.device", "torch.dtype"]:
        import torch

        device, dtype = None, self.dtype
        try:
            param = next(iter(self.model.parameters()))
            device = param.device
            if dtype is None and param.is_floating_point():
                dtype = param.dtype
        except (AttributeError, StopIteration, TypeError):
            pass
        if device is None:
            device = torch.device(resolve_device(self.device))
        if dtype is None or dtype not in (torch.float16, torch.bfloat16, torch.float32):
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        return device, dtype

    def answer(self, image: Image.Image, query: str) -> str:
        """Ask the expert one question about one image; return the decoded answer text."""
        import torch

        device, dtype = self._model_device_dtype()
        built = self.model.build_conversation_input_ids(
            self.tokenizer, query=query, images=[image], template_version=self.template_version
        )
        inputs = {
            "input_ids": built["input_ids"].unsqueeze(0).to(device),
            "token_type_ids": built["token_type_ids"].unsqueeze(0).to(device),
            "attention_mask": built["attention_mask"].unsqueeze(0).to(device),
            "images": [[built["images"][0].to(device).to(dtype)]],
        }
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        return str(self.tokenizer.decode(new_tokens[0], skip_special_tokens=True))

    def parse_answer(self, part: str, text: str, img_w: int, img_h: int) -> PartBox:
        """Turn one answer into a :class:`PartBox` (never raises)."""
        raw = text or ""
        if not raw.strip():
            return missing_box(part, raw=raw, status=STATUS_MISSING)
        groups = parse_cogvlm_boxes(raw)
        if not groups:
            return missing_box(part, raw=raw, status=STATUS_PARSE_ERROR)
        candidates = [rel1000_to_pixels(b, img_w, img_h) for group in groups for b in group]
        return choose_box(part, candidates, img_w, img_h, raw=raw, rule=self.multi_box)

    def ground(
        self, images: Sequence[Image.Image], keys: Sequence[str] | None = None, parts: Sequence[str] = PARTS
    ) -> list[list[PartBox]]:
        queries = [cogvlm_query(p) for p in parts]
        results: list[list[PartBox]] = []
        for image in images:
            image = image.convert("RGB")
            w, h = image.size
            results.append(
                [self.parse_answer(part, self.answer(image, query), w, h) for part, query in zip(parts, queries)]
            )
        return results


__all__ = [
    "COGVLM_MODEL_ID",
    "COGVLM_TOKENIZER_ID",
    "QUERY_TEMPLATE",
    "CogVLMBackend",
    "CogVLMSetupError",
    "check_transformers_version",
    "cogvlm_query",
    "load_cogvlm",
]
