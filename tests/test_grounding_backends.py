"""The real grounding backends (CogVLM, Florence-2, OWLv2, Grounding DINO, ViTPose), offline.

- CogVLM: a fake model object with canned answers (well-formed and malformed) end to end
  through ``ground()``; the loading guards (trust_remote_code opt-in, transformers range).
- Florence-2 / OWLv2 / Grounding DINO / ViTPose: tiny random-weight checkpoints built from
  configs (``tests/tiny_models.py``) loaded with ``from_pretrained(path)`` and run end to end;
  their outputs are random, so the checks are structural (one well-formed PartBox per part,
  inside the image, known statuses). The box logic is checked on controlled outputs: a fake
  generator with canned Florence-2 answers, fake detector heads with crafted logits/boxes
  going through the real processors' post-processing, and hand-made keypoints for ViTPose.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import tiny_models  # noqa: E402
from muva_core.grounding import PART_PHRASES, available_backends, get_backend  # noqa: E402
from muva_core.grounding.base import PartBox  # noqa: E402
from muva_core.grounding.boxes import STATUS_FALLBACK, stripe_box  # noqa: E402
from muva_core.grounding.cogvlm import (  # noqa: E402
    COGVLM_MODEL_ID,
    COGVLM_TOKENIZER_ID,
    CogVLMBackend,
    CogVLMSetupError,
    check_transformers_version,
    cogvlm_query,
)
from muva_core.grounding.detectors import GroundingDinoBackend, Owlv2Backend  # noqa: E402
from muva_core.grounding.florence2 import Florence2Backend  # noqa: E402
from muva_core.grounding.pose import COCO_KEYPOINTS, ViTPoseBackend, keypoints_to_part_boxes  # noqa: E402

PARTS = ("head", "upper", "legs")
KNOWN_STATUSES = {"ok", "missing", "parse_error", "clipped", "inverted", "multiple", "degenerate", STATUS_FALLBACK}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _offline_one_thread():
    """Offline Hub even if huggingface_hub was imported before HF_HUB_OFFLINE was set; and one
    torch thread (tiny models on a shared 2-core machine run much faster)."""
    from huggingface_hub import constants

    old_offline, old_threads = constants.HF_HUB_OFFLINE, torch.get_num_threads()
    constants.HF_HUB_OFFLINE = True
    torch.set_num_threads(1)
    yield
    constants.HF_HUB_OFFLINE = old_offline
    torch.set_num_threads(old_threads)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(80, 32), (64, 64), (128, 48)]]


def assert_well_formed(results, images, parts=PARTS) -> None:
    assert len(results) == len(images)
    for image, row in zip(images, results):
        assert [pb.part for pb in row] == list(parts)
        for pb in row:
            assert isinstance(pb, PartBox)
            assert set(pb.status.split("+")) <= KNOWN_STATUSES, pb.status
            assert math.isfinite(pb.score)
            assert isinstance(pb.raw, str)
            if pb.box is None:
                assert {"missing", "parse_error", "degenerate"} & set(pb.status.split("+")), pb.status
            else:
                x0, y0, x1, y1 = pb.box
                assert all(math.isfinite(v) for v in pb.box)
                assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height, (pb.box, image.size)


def test_all_backends_are_registered():
    names = available_backends()
    assert {"cogvlm", "florence2", "owlv2", "grounding_dino", "vitpose"} <= set(names)


# ===================================================================================== CogVLM
class FakeCogTokenizer:
    """Each generated 'token' is a whole canned answer; ids 0/1 are <s>/</s>."""

    def __init__(self) -> None:
        self.pieces = ["<s>", "</s>"]

    def add(self, text: str) -> int:
        self.pieces.append(text)
        return len(self.pieces) - 1

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        return "".join(self.pieces[i] for i in ids if not (skip_special_tokens and i in (0, 1)))


class FakeCogVLM:
    """Mimics the remote-code API the backend uses; answers by part phrase found in the query."""

    def __init__(self, tokenizer: FakeCogTokenizer, answers: dict[str, str]) -> None:
        self.tokenizer = tokenizer
        self.answers = answers
        self.built: list[dict] = []
        self.generated: list[dict] = []

    def parameters(self):
        yield torch.zeros(1)

    def build_conversation_input_ids(self, tokenizer, *, query, history=None, images=None, template_version=None):
        assert tokenizer is self.tokenizer
        self.built.append({"query": query, "template_version": template_version, "size": images[0].size, "n_images": len(images)})
        n = 7
        return {
            "input_ids": torch.arange(n),
            "token_type_ids": torch.zeros(n, dtype=torch.long),
            "attention_mask": torch.ones(n, dtype=torch.long),
            "images": [torch.zeros(3, 8, 8)],
        }

    def generate(self, input_ids, token_type_ids, attention_mask, images, **kwargs):
        query = self.built[-1]["query"]
        self.generated.append(
            {"kwargs": kwargs, "input_shape": tuple(input_ids.shape), "images": images, "mask_shape": tuple(attention_mask.shape)}
        )
        answer = next(a for phrase, a in self.answers.items() if phrase in query)
        new = torch.tensor([[self.tokenizer.add(answer), 1]])
        return torch.cat([input_ids, new], dim=1)


GOOD_COG = {
    "the head of the person": "the head of the person[[100,050,900,250]]",
    "the upper body of the person": "[[050,250,950,600]]",
    "the legs of the person": "[[100,500,900,999]]",
}


def make_cog(answers=GOOD_COG, **kwargs) -> tuple[CogVLMBackend, FakeCogVLM]:
    tok = FakeCogTokenizer()
    model = FakeCogVLM(tok, dict(answers))
    return CogVLMBackend(model=model, tokenizer=tok, **kwargs), model


def test_cogvlm_prompts_template_and_greedy_decoding():
    backend, model = make_cog()
    image = Image.new("RGB", (100, 200), (1, 2, 3))
    [row] = backend.ground([image])
    assert [b["query"] for b in model.built] == [
        "Guide me to the location of the head of the person within the image by providing its bounding boxes.",
        "Guide me to the location of the upper body of the person within the image by providing its bounding boxes.",
        "Guide me to the location of the legs of the person within the image by providing its bounding boxes.",
    ]
    assert [cogvlm_query(p) for p in PARTS] == [b["query"] for b in model.built]
    assert all(b["template_version"] == "base" and b["n_images"] == 1 and b["size"] == (100, 200) for b in model.built)
    for call in model.generated:
        assert call["kwargs"] == {"max_new_tokens": 64, "do_sample": False}
        assert call["input_shape"] == (1, 7) and call["mask_shape"] == (1, 7)  # batched prompt
        assert len(call["images"]) == 1 and call["images"][0][0].dtype == torch.float32  # [[image]] on CPU
    head, upper, legs = row
    assert head.box == pytest.approx((10.0, 10.0, 90.0, 50.0)) and head.status == "ok"
    assert head.raw == GOOD_COG["the head of the person"]
    assert upper.box == pytest.approx((5.0, 50.0, 95.0, 120.0)) and upper.status == "ok"
    assert legs.box == pytest.approx((10.0, 100.0, 90.0, 199.8)) and legs.status == "ok"


@pytest.mark.parametrize(
    "answer, box, status",
    [
        ("", None, "missing"),
        ("   ", None, "missing"),
        ("I cannot find the head in this image.", None, "parse_error"),
        ("[[100,050,900]]", None, "parse_error"),  # 3 numbers
        ("[[100,050,900,250", None, "parse_error"),  # unclosed
        ("[[900,250,100,050]]", (10.0, 10.0, 90.0, 50.0), "inverted"),
        ("[[100,050,1200,1100]]", (10.0, 10.0, 100.0, 200.0), "clipped"),  # > 999
        ("[[500,500,500,600]]", None, "degenerate"),
        ("[[100,050,300,150;200,100,900,250]]", (20.0, 20.0, 90.0, 50.0), "multiple"),  # two boxes: largest
        ("head[[100,050,300,150]] and [[200,100,900,250]]", (20.0, 20.0, 90.0, 50.0), "multiple"),  # two groups
        ("[[1,2,3]];[[900,250,100,050;5,5,5]]", (10.0, 10.0, 90.0, 50.0), "inverted"),  # junk + a valid box
    ],
)
def test_cogvlm_malformed_answers_end_to_end(answer, box, status):
    backend, _ = make_cog({**GOOD_COG, "the head of the person": answer})
    images = [Image.new("RGB", (100, 200)), Image.new("RGB", (100, 200))]
    results = backend.ground(images)
    assert_well_formed(results, images)
    for head, upper, legs in results:
        assert head.status == status
        assert head.raw == answer
        if box is None:
            assert head.box is None
        else:
            assert head.box == pytest.approx(box)
        assert upper.status == legs.status == "ok"  # other parts unaffected


def test_cogvlm_union_rule_for_several_boxes():
    backend, _ = make_cog({**GOOD_COG, "the legs of the person": "[[100,500,400,990;600,520,900,999]]"}, multi_box="union")
    [row] = backend.ground([Image.new("RGB", (100, 200))])
    assert row[2].box == pytest.approx((10.0, 100.0, 90.0, 199.8)) and row[2].status == "multiple"
    assert len(row[2].candidates) == 2


def test_cogvlm_subset_of_parts():
    backend, model = make_cog()
    [row] = backend.ground([Image.new("RGB", (100, 200))], parts=("legs",))
    assert [pb.part for pb in row] == ["legs"] and len(model.built) == 1


def test_cogvlm_loading_requires_explicit_remote_code_opt_in():
    with pytest.raises(CogVLMSetupError, match="trust_remote_code=True"):
        CogVLMBackend()
    with pytest.raises(CogVLMSetupError, match="trust_remote_code=True"):
        get_backend("cogvlm")
    assert CogVLMBackend.__init__.__kwdefaults__["model_id"] == COGVLM_MODEL_ID == "THUDM/cogvlm-grounding-generalist-hf"
    assert COGVLM_TOKENIZER_ID == "lmsys/vicuna-7b-v1.5"


@pytest.mark.parametrize("version, ok", [("4.35.0", True), ("4.41.2", True), ("4.41.0.dev0", True), ("4.34.1", False), ("4.42.0", False), ("5.24.0", False)])
def test_cogvlm_transformers_version_range(version, ok):
    if ok:
        assert check_transformers_version(version) == version
    else:
        with pytest.raises(CogVLMSetupError, match="environment-cogvlm.yml"):
            check_transformers_version(version)


def test_cogvlm_with_opt_in_checks_the_installed_transformers():
    import transformers

    if (4, 35) <= tuple(int(v) for v in transformers.__version__.split(".")[:2]) <= (4, 41):
        pytest.skip("this environment is the CogVLM one")
    with pytest.raises(CogVLMSetupError, match="transformers 4.35-4.41"):
        CogVLMBackend(trust_remote_code=True)


def test_cogvlm_environment_file():
    import yaml

    env = yaml.safe_load((REPO / "environment-cogvlm.yml").read_text())
    deps = env["dependencies"]
    flat = [d for d in deps if isinstance(d, str)]
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    assert "python=3.10" in flat
    assert any(p.startswith("torch==2.1") for p in pip)
    assert "transformers==4.41.2" in pip
    for pkg in ("accelerate", "bitsandbytes", "sentencepiece", "einops"):
        assert any(p.startswith(pkg) for p in pip), pkg


# ================================================================================ Florence-2
@pytest.fixture(scope="module")
def florence_dir(tmp_path_factory) -> Path:
    return tiny_models.build_florence2(tmp_path_factory.mktemp("florence2"))


def test_florence2_tiny_model_end_to_end(florence_dir, images):
    backend = Florence2Backend.from_pretrained(str(florence_dir), device="cpu", max_new_tokens=12, batch_size=2)
    results = backend.ground(images)
    assert_well_formed(results, images)
    assert all(pb.raw for row in results for pb in row)  # the raw answer is kept


class CannedFlorence(torch.nn.Module):
    """Stands in for Florence2ForConditionalGeneration.generate with canned answers per phrase."""

    def __init__(self, tokenizer, answers: dict[str, str]) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer = tokenizer
        self.answers = answers
        self.calls: list[dict] = []

    def generate(self, input_ids, pixel_values, attention_mask=None, **kwargs):
        prompts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        self.calls.append({"prompts": prompts, "pixel_values": tuple(pixel_values.shape), "kwargs": kwargs})
        texts = [next(a for phrase, a in self.answers.items() if prompt.endswith(phrase)) for prompt in prompts]
        return self.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")["input_ids"]


GOOD_FLORENCE = {
    "the head of the person": "</s><s>the head of the person<loc_100><loc_50><loc_899><loc_249></s>",
    "the upper body of the person": "</s><s><loc_100><loc_250><loc_900><loc_600></s>",  # no phrase: own parser
    "the legs of the person": "</s><s>the legs of the person<loc_100><loc_600><loc_450><loc_990><loc_500><loc_600><loc_900><loc_990></s>",
}


def make_florence(florence_dir, answers, **kwargs):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(florence_dir))
    model = CannedFlorence(processor.tokenizer, answers)
    return Florence2Backend(model=model, processor=processor, **kwargs), model


def test_florence2_canned_answers(florence_dir):
    backend, model = make_florence(florence_dir, GOOD_FLORENCE, batch_size=8)
    images = [Image.new("RGB", (100, 200)), Image.new("RGB", (100, 200))]
    results = backend.ground(images)
    assert_well_formed(results, images)
    assert len(model.calls) == 3  # one batched generation per part
    for call, part in zip(model.calls, PARTS):
        assert call["prompts"] == [f"Locate the phrases in the caption: {PART_PHRASES[part]}"] * 2
        assert call["kwargs"]["do_sample"] is False and call["kwargs"]["max_new_tokens"] == 64
    for head, upper, legs in results:
        assert head.box == pytest.approx((10, 10, 90, 50), abs=1.0) and head.status == "ok"
        assert upper.box == pytest.approx((10.05, 50.1, 90.05, 120.1)) and upper.status == "ok"
        assert legs.box == pytest.approx((50, 120, 90, 198), abs=1.0) and legs.status == "multiple"  # larger of two


@pytest.mark.parametrize(
    "answer, box, status",
    [
        ("</s><s></s>", None, "missing"),
        ("</s><s>I see a person</s>", None, "parse_error"),
        ("</s><s>head<loc_100><loc_50></s>", None, "parse_error"),  # too few locations
        ("</s><s>head<loc_900><loc_249><loc_100><loc_50></s>", (10, 10, 90, 50), "inverted"),
        ("</s><s>head<loc_100><loc_50><loc_1500><loc_249></s>", (10, 10, 100, 50), "clipped"),
        ("</s><s>head<loc_500><loc_50><loc_500><loc_249></s>", None, "degenerate"),
    ],
)
def test_florence2_malformed_answers(florence_dir, answer, box, status):
    backend, _ = make_florence(florence_dir, {**GOOD_FLORENCE, "the head of the person": answer})
    images = [Image.new("RGB", (100, 200))]
    [[head, upper, legs]] = backend.ground(images)
    assert head.status == status and head.raw == answer
    if box is None:
        assert head.box is None
    else:
        assert head.box == pytest.approx(box, abs=1.0)
    assert upper.status == "ok"


# =================================================================================== OWLv2
@pytest.fixture(scope="module")
def owlv2_dir(tmp_path_factory) -> Path:
    return tiny_models.build_owlv2(tmp_path_factory.mktemp("owlv2"))


def test_owlv2_tiny_model_end_to_end(owlv2_dir, images):
    backend = Owlv2Backend.from_pretrained(str(owlv2_dir), device="cpu", score_threshold=0.0)
    results = backend.ground(images)
    assert_well_formed(results, images)
    # each image is resized/padded on its own: batching does not change the answer
    one_by_one = Owlv2Backend(model=backend.model, processor=backend.processor, score_threshold=0.0, batch_size=1).ground(images)
    assert [[(pb.box, pb.status) for pb in row] for row in one_by_one] == [[(pb.box, pb.status) for pb in row] for row in results]
    # an impossible threshold: every part missing, the best score kept
    strict = Owlv2Backend(model=backend.model, processor=backend.processor, score_threshold=1.01).ground(images[:1])
    assert all(pb.box is None and pb.status == "missing" and "threshold" in pb.raw for pb in strict[0])


class CannedDetector(torch.nn.Module):
    """A detection head returning crafted logits / boxes (batch-sliced) in the real output class."""

    def __init__(self, output_cls, logits: torch.Tensor, pred_boxes: torch.Tensor) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.output_cls, self.logits, self.pred_boxes = output_cls, logits, pred_boxes
        self.inputs: dict = {}

    def forward(self, **inputs):
        self.inputs = inputs
        n = inputs["pixel_values"].shape[0]
        return self.output_cls(logits=self.logits[:n], pred_boxes=self.pred_boxes[:n])


def test_owlv2_picks_highest_scoring_box_per_part(owlv2_dir):
    from transformers import Owlv2Processor
    from transformers.models.owlv2.modeling_owlv2 import Owlv2ObjectDetectionOutput

    # image 32 x 80: OWLv2 pads to an 80 x 80 square, boxes are relative to it (cx, cy, w, h)
    boxes = torch.tensor([[[0.2, 0.15, 0.2, 0.2], [0.2, 0.45, 0.3, 0.4], [0.2, 0.75, 0.3, 0.5], [0.8, 0.5, 0.2, 0.2]]])
    logits = torch.full((1, 4, 3), -5.0)
    logits[0, 0, 0], logits[0, 3, 0] = 3.0, 4.0  # head: best box lies in the padding -> next one
    logits[0, 1, 1] = 2.0  # upper
    model = CannedDetector(Owlv2ObjectDetectionOutput, logits, boxes)
    backend = Owlv2Backend(model=model, processor=Owlv2Processor.from_pretrained(str(owlv2_dir)), score_threshold=0.1)
    [[head, upper, legs]] = backend.ground([Image.new("RGB", (32, 80))])
    assert model.inputs["input_ids"].shape[0] == 3  # one text query per part
    assert head.box == pytest.approx((8.0, 4.0, 24.0, 20.0), abs=1e-4)
    assert head.status == "multiple" and head.score == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item())
    assert upper.box == pytest.approx((4.0, 20.0, 28.0, 52.0), abs=1e-4) and upper.status == "ok"
    assert legs.box is None and legs.status == "missing" and "< threshold" in legs.raw
    assert legs.score == pytest.approx(torch.sigmoid(torch.tensor(-5.0)).item())


# =========================================================================== Grounding DINO
@pytest.fixture(scope="module")
def gdino_dir(tmp_path_factory) -> Path:
    return tiny_models.build_grounding_dino(tmp_path_factory.mktemp("grounding_dino"))


def test_grounding_dino_tiny_model_end_to_end(gdino_dir, images):
    backend = GroundingDinoBackend.from_pretrained(str(gdino_dir), device="cpu", score_threshold=0.0, batch_size=2)
    results = backend.ground(images)
    assert_well_formed(results, images)


def test_grounding_dino_scores_parts_by_their_tokens(gdino_dir):
    from transformers import GroundingDinoProcessor
    from transformers.models.grounding_dino.modeling_grounding_dino import GroundingDinoObjectDetectionOutput

    processor = GroundingDinoProcessor.from_pretrained(str(gdino_dir))
    backend = GroundingDinoBackend(model=torch.nn.Linear(1, 1), processor=processor)
    text, spans = backend.caption(PARTS)
    assert text == "the head of the person. the upper body of the person. the legs of the person."
    # [CLS] the head of the person . the upper body of the person . the legs of the person . [SEP]
    assert backend.token_spans(text, spans) == [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12], [14, 15, 16, 17, 18]]

    # image 40 x 90; boxes relative to the image (cx, cy, w, h)
    boxes = torch.tensor([[[0.5, 0.1, 0.5, 0.2], [0.5, 0.4, 0.8, 0.4], [0.5, 0.75, 0.6, 0.5], [0.5, 0.5, 1.0, 1.0]]])
    logits = torch.full((1, 4, 32), -10.0)
    logits[0, 0, 2] = 3.0  # "head" token
    logits[0, 3, 5] = 0.5  # "person" of the head phrase: a second, weaker head box
    logits[0, 1, 8] = 2.0  # "upper"
    logits[0, 2, 15] = 1.5  # "legs"
    logits[0, 2, 13] = 9.0  # the "." between phrases belongs to no part
    model = CannedDetector(GroundingDinoObjectDetectionOutput, logits, boxes)
    backend = GroundingDinoBackend(model=model, processor=processor, score_threshold=0.3)
    [[head, upper, legs]] = backend.ground([Image.new("RGB", (40, 90))])
    assert head.box == pytest.approx((10.0, 0.0, 30.0, 18.0), abs=1e-4) and head.status == "multiple"
    assert head.score == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item())
    assert upper.box == pytest.approx((4.0, 18.0, 36.0, 54.0), abs=1e-4) and upper.status == "ok"
    assert legs.box == pytest.approx((8.0, 45.0, 32.0, 90.0), abs=1e-4) and legs.status == "ok"
    assert legs.score == pytest.approx(torch.sigmoid(torch.tensor(1.5)).item())


def test_detectors_reject_unknown_parts(gdino_dir):
    from transformers import GroundingDinoProcessor

    backend = GroundingDinoBackend(model=torch.nn.Linear(1, 1), processor=GroundingDinoProcessor.from_pretrained(str(gdino_dir)))
    with pytest.raises(ValueError, match="unknown part"):
        backend.ground([Image.new("RGB", (8, 8))], parts=("arms",))


@pytest.mark.parametrize("backend_cls", [Owlv2Backend, GroundingDinoBackend, Florence2Backend, ViTPoseBackend])
def test_missing_checkpoint_gives_a_clear_error(tmp_path, backend_cls):
    with pytest.raises(FileNotFoundError, match="no model checkpoint directory"):
        backend_cls.from_pretrained(str(tmp_path / "no-such-model"), device="cpu")


def test_uncached_hub_id_offline_gives_a_clear_error():
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache("google/owlv2-base-patch16-ensemble", "config.json"), str):
        pytest.skip("the real OWLv2 checkpoint is cached here")
    with pytest.raises(OSError, match="could not load owlv2 from 'google/owlv2-base-patch16-ensemble'"):
        Owlv2Backend(device="cpu")  # the real default checkpoint, not in the (offline) cache


# ================================================================================= ViTPose
def person_keypoints(dy: float = 0.0) -> np.ndarray:
    """An upright person facing the camera in a 64 x 128 image (COCO order)."""
    pts = {
        "nose": (32, 14), "left_eye": (35, 11), "right_eye": (29, 11), "left_ear": (38, 13), "right_ear": (26, 13),
        "left_shoulder": (44, 30), "right_shoulder": (20, 30), "left_elbow": (48, 48), "right_elbow": (16, 48),
        "left_wrist": (50, 64), "right_wrist": (14, 64), "left_hip": (40, 66), "right_hip": (24, 66),
        "left_knee": (40, 92), "right_knee": (24, 92), "left_ankle": (40, 118), "right_ankle": (24, 118),
    }  # fmt: skip
    return np.array([pts[n] for n in COCO_KEYPOINTS], dtype=float) + np.array([0.0, dy])


def scores_with(low: tuple[str, ...] = (), value: float = 0.9) -> np.ndarray:
    s = np.full(17, value)
    for name in low:
        s[COCO_KEYPOINTS.index(name)] = 0.05
    return s


def test_keypoints_to_part_boxes_upright_person():
    head, upper, legs = keypoints_to_part_boxes(person_keypoints(), scores_with(), 64, 128)
    # head: ear-to-ear 12 px = head size; +10% margin, up 0.8x to the crown, down 0.6x to the chin
    assert head.box == pytest.approx((24.8, 1.4, 39.2, 21.2))
    # upper body: shoulders (- margin) to hips, x over shoulders / elbows / wrists (+ margin)
    assert upper.box == pytest.approx((10.4, 26.4, 53.6, 66.0))
    # legs: hips to ankles + margin for the feet
    assert legs.box == pytest.approx((22.4, 66.0, 41.6, 123.2))
    assert [pb.status for pb in (head, upper, legs)] == ["ok", "ok", "ok"]
    assert all(pb.score == pytest.approx(0.9) for pb in (head, upper, legs))
    assert head.box[3] < 30 < upper.box[3] <= legs.box[1] + 1e-9  # chin above the shoulders, order kept
    assert "nose" in head.raw and "left_ankle" in legs.raw


def test_keypoints_to_part_boxes_low_confidence_falls_back_to_stripes():
    head_kps = ("nose", "left_eye", "right_eye", "left_ear", "right_ear")
    head, upper, legs = keypoints_to_part_boxes(person_keypoints(), scores_with(low=head_kps), 64, 128)
    assert head.box == stripe_box("head", 64, 128) and head.status == STATUS_FALLBACK and head.score == 0.0
    assert upper.status == legs.status == "ok"
    # no hips: neither upper body nor legs can be bounded
    _, upper, legs = keypoints_to_part_boxes(person_keypoints(), scores_with(low=("left_hip", "right_hip")), 64, 128)
    assert upper.box == stripe_box("upper", 64, 128) and upper.status == STATUS_FALLBACK
    assert legs.box == stripe_box("legs", 64, 128) and legs.status == STATUS_FALLBACK
    # everything below min_score
    out = keypoints_to_part_boxes(person_keypoints(), np.full(17, 0.2), 64, 128, min_score=0.3)
    assert [pb.status for pb in out] == [STATUS_FALLBACK] * 3


def test_keypoints_to_part_boxes_partial_keypoints():
    # nose only (+ shoulders for the scale): head size = half the shoulder width
    low = ("left_eye", "right_eye", "left_ear", "right_ear")
    head, _, _ = keypoints_to_part_boxes(person_keypoints(), scores_with(low=low), 64, 128)
    assert head.box == pytest.approx((27.2, 4.4, 36.8, 21.2)) and head.status == "ok"
    # no ankles: the lower leg is extrapolated from the thigh (knee + hip-to-knee)
    _, _, legs = keypoints_to_part_boxes(person_keypoints(), scores_with(low=("left_ankle", "right_ankle")), 64, 128)
    assert legs.box == pytest.approx((22.4, 66.0, 41.6, 123.2)) and legs.status == "ok"
    # NaN keypoints count as missing
    kpts = person_keypoints()
    kpts[COCO_KEYPOINTS.index("left_hip")] = np.nan
    _, upper, _ = keypoints_to_part_boxes(kpts, scores_with(), 64, 128)
    assert upper.status == "ok" and math.isfinite(upper.box[0])


def test_keypoints_to_part_boxes_clips_at_the_border():
    head, upper, legs = keypoints_to_part_boxes(person_keypoints(dy=-8.0), scores_with(), 64, 128)
    assert head.box[1] == 0.0 and head.status == "clipped"
    _, _, legs = keypoints_to_part_boxes(person_keypoints(dy=8.0), scores_with(), 64, 128)
    assert legs.box[3] == 128.0 and legs.status == "clipped"
    with pytest.raises(ValueError, match="17 COCO keypoints"):
        keypoints_to_part_boxes(np.zeros((5, 2)), np.zeros(5), 64, 128)


@pytest.fixture(scope="module")
def vitpose_dir(tmp_path_factory) -> Path:
    return tiny_models.build_vitpose(tmp_path_factory.mktemp("vitpose"))


@pytest.mark.parametrize("min_score", [0.0, 0.3])
def test_vitpose_tiny_model_end_to_end(vitpose_dir, images, min_score):
    backend = ViTPoseBackend.from_pretrained(str(vitpose_dir), device="cpu", min_score=min_score, batch_size=2)
    results = backend.ground(images)
    assert_well_formed(results, images)
    if min_score == 0.0:  # every keypoint is used: no part falls back for lack of keypoints
        assert all(pb.raw for row in results for pb in row)


class CannedPose(torch.nn.Module):
    """A ViTPose head whose 17 heatmaps all peak at the centre of the (16 x 12) heatmap."""

    def forward(self, pixel_values):
        from transformers.models.vitpose.modeling_vitpose import VitPoseEstimatorOutput

        self.pixel_values = pixel_values
        h, w = pixel_values.shape[-2] // 4, pixel_values.shape[-1] // 4
        yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
        peak = torch.exp(-((xx - (w - 1) / 2) ** 2 + (yy - (h - 1) / 2) ** 2) / (2 * 1.5**2))
        return VitPoseEstimatorOutput(heatmaps=peak.expand(pixel_values.shape[0], 17, h, w).clone())

    def parameters(self, recurse: bool = True):
        yield torch.zeros(1)


def test_vitpose_person_box_and_keypoint_space(vitpose_dir):
    """Keypoints come back in image pixels, relative to the person box: a heatmap peak at the
    centre lands on the centre of the person box, wherever that box is."""
    from transformers import VitPoseImageProcessor

    canvas = Image.new("RGB", (200, 300), (0, 0, 0))
    seen = []

    def person_box(im):
        seen.append(im.size)
        return (40.0, 100.0, 48.0, 128.0)  # x, y, w, h: centre (64, 164)

    processor = VitPoseImageProcessor.from_pretrained(str(vitpose_dir))
    backend = ViTPoseBackend(model=CannedPose(), processor=processor)
    [(kpts, scores)] = backend.keypoints([Image.new("RGB", (48, 128))])
    assert kpts.shape == (17, 2) and scores.shape == (17,)
    np.testing.assert_allclose(kpts, np.tile([24.0, 64.0], (17, 1)), atol=2.0)  # whole image by default
    np.testing.assert_allclose(scores, math.exp(-0.5 / (2 * 1.5**2)), atol=1e-4)  # grid max next to the peak

    backend = ViTPoseBackend(model=CannedPose(), processor=processor, person_box=person_box)
    [(kpts, _)] = backend.keypoints([canvas])
    assert seen == [(200, 300)]
    np.testing.assert_allclose(kpts, np.tile([64.0, 164.0], (17, 1)), atol=2.0)
    # all keypoints on one point: every part degenerates and falls back to its stripe
    [row] = backend.ground([canvas])
    assert [pb.status for pb in row] == [STATUS_FALLBACK] * 3
    assert row[2].box == stripe_box("legs", 200, 300)


def test_get_backend_builds_real_backends_with_injected_objects(vitpose_dir):
    from transformers import VitPoseForPoseEstimation, VitPoseImageProcessor

    model = VitPoseForPoseEstimation.from_pretrained(str(vitpose_dir)).eval()
    backend = get_backend("vitpose", model=model, processor=VitPoseImageProcessor.from_pretrained(str(vitpose_dir)))
    assert isinstance(backend, ViTPoseBackend) and backend.name == "vitpose"
    assert len(backend.ground([Image.new("RGB", (32, 64))])[0]) == 3
