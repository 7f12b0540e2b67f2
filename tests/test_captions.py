"""Captions of synthetic identities: determinism, truthful mentions, part vocabulary, zero-shot prompts."""
from __future__ import annotations

import re

import numpy as np
import pytest

from muva_core.data.captions import (
    GRANULARITIES,
    PART_NOUNS,
    ZERO_SHOT_ATTRIBUTES,
    attribute_value,
    caption,
    captions,
    color_word,
    zero_shot_prompts,
)
from muva_core.data.synthetic import PALETTES, sample_identity
from muva_core.model.prompts import TEMPLATES

ATTRS = {
    "head": {"skin": "fair", "hair": "black", "hair_length": "long", "hat": "cap", "hat_color": "yellow"},
    "upper": {"garment": "red", "pattern": "stripes", "pattern_color": "white", "logo_shape": None,
              "sleeves": "long", "bag": "backpack", "bag_color": "navy", "bag_side": "left"},
    "legs": {"lower": "trousers", "lower_color": "jeans", "shoes": "white"},
}
ALL_COLORS = sorted({color_word(c) for pal in PALETTES.values() for c in pal} - {"jeans"}, key=len, reverse=True)
PART_WORDS = {"head": ("hair", "cap", "beanie", "hat", "bald"),
              "upper": ("shirt", "backpack", "bag", "stripes", "logo", "checks", "sleeved"),
              "legs": ("jeans", "trousers", "shorts", "skirt", "shoes", "denim")}


def _colors_in(text: str) -> set[str]:
    """Colour names in ``text`` (longest first, so "light blue" is not also read as "blue")."""
    found, rest = set(), text.lower()
    for c in ALL_COLORS:
        if re.search(rf"\b{c}\b", rest):
            found.add(c)
            rest = re.sub(rf"\b{c}\b", " ", rest)
    return found


def test_captions_are_deterministic_in_the_seed():
    a, b = captions(ATTRS, seed=3, per_granularity=5), captions(ATTRS, seed=3, per_granularity=5)
    assert a == b
    assert set(a) == set(GRANULARITIES) and all(len(v) == 5 for v in a.values())
    assert captions(ATTRS, seed=4, per_granularity=5) != a
    rng1, rng2 = np.random.default_rng(7), np.random.default_rng(7)
    assert [caption(ATTRS, "upper", rng1) for _ in range(6)] == [caption(ATTRS, "upper", rng2) for _ in range(6)]


def test_captions_mention_only_the_identitys_colours_and_cover_them_all():
    caps = captions(ATTRS, seed=0, per_granularity=200)
    own = {"head": {"black", "yellow"}, "upper": {"red", "white", "navy"}, "legs": {"white", "blue"}}
    for g, texts in caps.items():
        allowed = set().union(*own.values()) if g == "global" else own[g]
        seen = set()
        for t in texts:
            cols = _colors_in(t)
            assert cols <= allowed, f"{g}: {t!r} mentions {cols - allowed}"
            seen |= cols
        assert seen == allowed, f"{g}: never mentions {allowed - seen}"
    everything = " ".join(caps["global"])
    for phrase in ("long black hair", "a yellow cap", "red striped shirt", "white stripes", "navy backpack",
                   "blue jeans", "white shoes"):
        assert phrase in everything, phrase


def test_part_captions_use_the_part_nouns_of_muva_templates_and_stay_on_their_part():
    for part, noun in PART_NOUNS.items():
        assert TEMPLATES[part].endswith(f"{noun} of a person."), "part nouns must match MUVA's templates"
    caps = captions(ATTRS, seed=1, per_granularity=100)
    for part in PART_NOUNS:
        others = [w for p, ws in PART_WORDS.items() if p != part for w in ws]
        for t in caps[part]:
            assert f"{PART_NOUNS[part]} of a person" in t, t
            assert not any(re.search(rf"\b{w}\b", t) for w in others), f"{part}: {t!r} mentions another part"
    assert any(t.startswith("A photo of a ") and t.endswith("head of a person with a yellow cap.") for t in caps["head"])
    # the global captions never use part nouns
    assert not any(f"{n} of a person" in t for t in caps["global"] for n in PART_NOUNS.values())


def test_vocabulary_special_cases():
    assert color_word("light_blue") == "light blue" and color_word("dark_brown") == "dark brown"
    bald = {**ATTRS, "head": {**ATTRS["head"], "hair_length": "bald", "hat": "none", "hat_color": None}}
    for t in captions(bald, seed=0, per_granularity=60)["head"]:
        assert "black" not in t, "a bald head has no hair colour"
        assert "bald" in t or "hat" in t, t
    shorts = {**ATTRS, "legs": {"lower": "shorts", "lower_color": "jeans", "shoes": "red"}}
    legs = " ".join(captions(shorts, seed=0, per_granularity=60)["legs"])
    assert "denim shorts" in legs and "jeans" not in legs
    with pytest.raises(ValueError, match="granularity"):
        caption(ATTRS, "feet", np.random.default_rng(0))
    with pytest.raises(ValueError, match="lacks"):
        caption({"head": ATTRS["head"]}, "global", np.random.default_rng(0))


def test_zero_shot_prompts_are_in_the_caption_distribution():
    for name, spec in ZERO_SHOT_ATTRIBUTES.items():
        for mode in ("global", "part"):
            prompts = zero_shot_prompts(name, mode)
            assert list(prompts) == list(spec.values)
            assert len(set(prompts.values())) == len(prompts), f"{name}: prompts must differ"
            if mode == "part":
                assert all(f"the {PART_NOUNS[spec.part]} of a person" in p for p in prompts.values())
    assert zero_shot_prompts("upper_color")["red"] == "A photo of a person in a red shirt."
    assert zero_shot_prompts("trouser_color", "part")["jeans"] == "A photo of the legs of a person in blue jeans."
    assert zero_shot_prompts("bag")["none"] == "A photo of a person without a bag."
    # each single-attribute prompt is a sentence the captioner itself writes for a matching identity
    caps = captions(ATTRS, seed=0, per_granularity=400)
    for name, mode, g in (("upper_color", "global", "global"), ("shoe_color", "global", "global"),
                          ("hair_color", "part", "head"), ("trouser_color", "part", "legs")):
        prompt = zero_shot_prompts(name, mode)[attribute_value(ATTRS, name)]
        assert prompt in caps[g], (name, prompt)
    with pytest.raises(KeyError):
        zero_shot_prompts("eye_color")
    with pytest.raises(ValueError):
        zero_shot_prompts("hat", "head")


def test_attribute_values_of_generated_identities_and_caption_lengths():
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer(context_length=77)
    rng = np.random.default_rng(0)
    for _ in range(40):
        a = sample_identity(rng)
        for name, spec in ZERO_SHOT_ATTRIBUTES.items():
            v = attribute_value(a, name)
            assert v is None or v in spec.values, (name, v)
        assert (attribute_value(a, "hair_color") is None) == (a["head"]["hair_length"] == "bald")
        assert (attribute_value(a, "trouser_color") is None) == (a["legs"]["lower"] != "trousers")
        for texts in captions(a, seed=1, per_granularity=3).values():
            for t in texts:
                assert len(tok.encode(t)) + 2 <= 77, t
