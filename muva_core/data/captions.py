"""Captions of synthetic identities: attribute dicts -> global and part-level sentences.

Used to pretrain a small CLIP on synthetic pedestrians (:mod:`muva_core.pretrain`) so that its
text tower carries meaning where MUVA's multi-grained prompts read it. The part captions use
the same nouns as MUVA's templates (:data:`muva_core.model.prompts.TEMPLATES`): "head of a
person", "upper body of a person", "legs of a person", and the opening "A photo of a".

* An attribute dict is what :func:`muva_core.data.synthetic.sample_identity` draws (``head``,
  ``upper``, ``legs`` dicts; colour names in ``hair``, ``garment``, ``lower_color``, ...).
* Every caption mentions a random subset of the attributes (at least one) in one of several
  phrasings, so single-attribute sentences (the zero-shot prompts) are in distribution.
* One vocabulary throughout: colour names of the synthetic palettes with ``_`` as a space
  ("dark brown", "light blue"); the denim lower colour is "blue jeans" (trousers) or "denim"
  (shorts, skirt); garments are "shirt", "trousers", "shorts", "skirt", "shoes", "cap",
  "beanie", "backpack", "shoulder bag".
* Deterministic: every function takes a :class:`numpy.random.Generator` (or a seed).

Usage::

    caps = captions(attrs, seed=0)            # {"global": [...], "head": [...], "upper": [...], "legs": [...]}
    text = caption(attrs, "upper", rng)       # "A photo of the upper body of a person in a red striped shirt."
    prompts = zero_shot_prompts("upper_color")  # {"black": "A photo of a person in a black shirt.", ...}
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .samples import PARTS

__all__ = [
    "GRANULARITIES",
    "PART_NOUNS",
    "ZeroShotAttribute",
    "ZERO_SHOT_ATTRIBUTES",
    "color_word",
    "attribute_value",
    "caption",
    "caption_facts",
    "captions",
    "facts_true_of",
    "HARD_NEGATIVE_SWAPS",
    "hard_negative_caption",
    "zero_shot_prompts",
]

GRANULARITIES: tuple[str, ...] = ("global", *PARTS)
"""Caption granularities: the whole person and the three parts (the order of MUVA's features)."""

PART_NOUNS: dict[str, str] = {"head": "head", "upper": "upper body", "legs": "legs"}
"""The part nouns of MUVA's templates ("A photo of a X X X X upper body of a person.")."""

# the synthetic palettes (muva_core.data.synthetic.PALETTES); repeated here so that the caption
# vocabulary is explicit and importing captions does not need the generator
HAIR_COLORS = ("black", "dark_brown", "brown", "blonde", "auburn", "grey", "white")
GARMENT_COLORS = ("black", "white", "grey", "navy", "blue", "light_blue", "red", "maroon", "green", "olive",
                  "yellow", "orange", "pink", "purple", "beige", "brown")
LOWER_COLORS = ("jeans", "black", "grey", "beige", "brown", "navy", "olive", "white", "red", "light_blue")
SHOE_COLORS = ("black", "white", "brown", "red", "blue", "grey", "yellow")
BAG_COLORS = ("black", "brown", "navy", "grey", "red", "olive", "beige")


def color_word(name: str) -> str:
    """A palette colour name as words: ``light_blue`` -> ``light blue``."""
    return str(name).replace("_", " ")


def _join(items: Sequence[str]) -> str:
    items = [i for i in items if i]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _a(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


# ---------------------------------------------------------------------------------------------
# phrases of single attributes

def hair_phrase(head: dict, length: bool = True, color: bool = True) -> str:
    """``long black hair`` / ``black hair`` / ``long hair``; ``a bald head`` when bald."""
    if head.get("hair_length") == "bald":
        return "a bald head"
    words = [head.get("hair_length", "short") if length else "", color_word(head["hair"]) if color else ""]
    return " ".join(w for w in words if w) + " hair" if any(words) else "hair"


def hat_phrase(head: dict, color: bool = True) -> str:
    """``a red cap`` / ``a beanie``; ``no hat`` when there is none."""
    hat = head.get("hat", "none")
    if not hat or hat == "none":
        return "no hat"
    return _a(f"{color_word(head['hat_color'])} {hat}" if color and head.get("hat_color") else str(hat))


def shirt_phrase(upper: dict, color: bool = True, pattern: bool = True, sleeves: bool = False,
                 pattern_detail: bool = False) -> str:
    """``a red striped shirt``, ``a long-sleeved red shirt with white stripes``, ``a shirt with a logo``."""
    pat = upper.get("pattern", "plain")
    adj = ["plain"] if pattern and pat == "plain" else []
    if sleeves:
        adj.append(f"{upper.get('sleeves', 'long')}-sleeved")
    if color:
        adj.append(color_word(upper["garment"]))
    tail = ""
    if pattern and pat != "plain":
        pc = color_word(upper["pattern_color"]) + " " if pattern_detail and upper.get("pattern_color") else ""
        if pat == "logo":
            shape = upper.get("logo_shape") if pattern_detail and upper.get("logo_shape") else ""
            tail = " with " + _a(" ".join(w for w in (pc.strip(), shape, "logo") if w))
        elif pattern_detail and pc:
            tail = f" with {pc}{'stripes' if pat == 'stripes' else 'checks'}"
        else:
            adj.append("striped" if pat == "stripes" else "checked")
    return _a(" ".join(adj + ["shirt"])) + tail


def bag_phrase(upper: dict, color: bool = True) -> str:
    """``a black backpack`` / ``a shoulder bag``; ``no bag`` when there is none."""
    bag = upper.get("bag", "none")
    if not bag or bag == "none":
        return "no bag"
    noun = color_word(bag)
    return _a(f"{color_word(upper['bag_color'])} {noun}" if color and upper.get("bag_color") else noun)


def lower_phrase(legs: dict, color: bool = True) -> str:
    """``blue jeans``, ``grey trousers``, ``denim shorts``, ``a red skirt``, ``shorts``."""
    kind, col = legs.get("lower", "trousers"), legs.get("lower_color")
    if col == "jeans" and color:
        word = "blue jeans" if kind == "trousers" else f"denim {kind}"
    else:
        word = f"{color_word(col)} {kind}" if color and col else str(kind)
    return _a(word) if kind == "skirt" else word


def shoes_phrase(legs: dict, color: bool = True) -> str:
    """``white shoes`` / ``shoes``."""
    return f"{color_word(legs['shoes'])} shoes" if color else "shoes"


# ---------------------------------------------------------------------------------------------
# random phrase selection: each part yields "with" phrases (worn by / belonging to) and "in" phrases

def _head_phrases(head: dict, rng: np.random.Generator, keep: float) -> list[str]:
    out = []
    bald = head.get("hair_length") == "bald"
    if rng.random() < keep:
        ln, cl = (True, True) if bald else [(True, True), (False, True), (True, False)][int(rng.integers(3))]
        out.append(hair_phrase(head, length=ln, color=cl))
    if rng.random() < keep:
        if head.get("hat", "none") != "none" or rng.random() < 0.3:
            out.append(hat_phrase(head, color=rng.random() < 0.8))
    if not out:
        out.append(hair_phrase(head))
    return out


def _upper_phrases(upper: dict, rng: np.random.Generator, keep: float) -> tuple[list[str], list[str]]:
    shirt = []
    if rng.random() < max(keep, 0.75):
        color = rng.random() < 0.85
        shirt.append(shirt_phrase(upper, color=color, pattern=rng.random() < 0.6 or not color,
                                  sleeves=rng.random() < 0.35, pattern_detail=rng.random() < 0.4))
    bag = []
    if rng.random() < keep and (upper.get("bag", "none") != "none" or rng.random() < 0.3):
        bag.append(bag_phrase(upper, color=rng.random() < 0.7))
    if not shirt and not bag:
        shirt.append(shirt_phrase(upper))
    return shirt, bag


def _legs_phrases(legs: dict, rng: np.random.Generator, keep: float) -> list[str]:
    out = []
    if rng.random() < max(keep, 0.7):
        out.append(lower_phrase(legs, color=rng.random() < 0.85))
    if rng.random() < keep:
        out.append(shoes_phrase(legs, color=rng.random() < 0.9))
    if not out:
        out.append(lower_phrase(legs))
    return out


def _with_clause(items: list[str]) -> str:
    """``with long hair, a red cap and a backpack``; "no X" items read ``without a X``."""
    pos = [i for i in items if not i.startswith("no ")]
    neg = [_a(i[3:]) for i in items if i.startswith("no ")]
    parts = []
    if pos:
        parts.append("with " + _join(pos))
    if neg:
        parts.append("without " + " or ".join(neg))
    return " and ".join(parts)


_GLOBAL_FORMS = (
    "A photo of a person {w} wearing {c}.",
    "A photo of a person wearing {c}, {w}.",
    "A photo of a person in {c} {w}.",
    "A person in {c}, {w}.",
    "Someone wearing {c}, {w}.",
)


def _global_caption(attrs: dict, rng: np.random.Generator) -> str:
    use = [p for p in PARTS if rng.random() < 0.75] or [PARTS[int(rng.integers(3))]]
    keep = 0.8 if len(use) == 1 else 0.6
    w: list[str] = []
    c: list[str] = []
    if "head" in use:
        w += _head_phrases(attrs["head"], rng, keep)
    if "upper" in use:
        shirt, bag = _upper_phrases(attrs["upper"], rng, keep)
        c += shirt
        w += bag
    if "legs" in use:
        c += _legs_phrases(attrs["legs"], rng, keep)
    wc, cc = _with_clause(w), _join(c)
    if not cc:
        return f"A photo of a person {wc}." if rng.random() < 0.7 else f"A person {wc}."
    if not wc:
        return ("A photo of a person wearing {c}." if rng.random() < 0.5 else "A photo of a person in {c}.").format(c=cc)
    form = _GLOBAL_FORMS[int(rng.integers(len(_GLOBAL_FORMS)))]
    return form.format(w=wc, c=cc)


def _part_caption(attrs: dict, part: str, rng: np.random.Generator) -> str:
    form = int(rng.integers(3))
    if part == "head":
        head = attrs["head"]
        items = _head_phrases(head, rng, 0.7)
        if form == 2 and head.get("hair_length") != "bald":  # template-style: adjectives before the part noun
            hat = [i for i in items if "cap" in i or "beanie" in i]
            adj = f"{head['hair_length']} {color_word(head['hair'])}-haired"
            return f"A photo of a {adj} head of a person" + (f" with {hat[0]}." if hat else ".")
        if form == 2:
            hat = [i for i in items if "cap" in i or "beanie" in i]
            return "A photo of a bald head of a person" + (f" with {hat[0]}." if hat else ".")
        lead = "A photo of the head of a person" if form == 0 else "The head of a person"
        return f"{lead} {_with_clause(items)}."
    if part == "upper":
        upper = attrs["upper"]
        shirt, bag = _upper_phrases(upper, rng, 0.7)
        bag_txt = f" {_with_clause(bag)}" if bag else ""
        if form == 2:  # template-style
            adj = [color_word(upper["garment"])]
            if upper.get("pattern", "plain") != "plain" and rng.random() < 0.7:
                adj.append({"stripes": "striped", "checks": "checked", "logo": "logo"}[upper["pattern"]])
            if rng.random() < 0.4:
                adj.append(f"{upper.get('sleeves', 'long')}-sleeved")
            return f"A photo of {_a(' '.join(adj))} upper body of a person{bag_txt}."
        if not shirt:
            return f"A photo of the upper body of a person{bag_txt}."
        lead = "A photo of the upper body of a person in" if form == 0 else "The upper body of a person wearing"
        return f"{lead} {_join(shirt)}{bag_txt}."
    if part == "legs":
        legs = attrs["legs"]
        items = _legs_phrases(legs, rng, 0.7)
        if form == 2:  # template-style ("A photo of X X X X legs of a person.")
            lower = lower_phrase(legs)
            lower = lower[2:] if lower.startswith("a ") else lower
            shoes = [i for i in items if i.endswith("shoes")]
            return f"A photo of {lower} legs of a person" + (f" with {shoes[0]}." if shoes else ".")
        lead = "A photo of the legs of a person in" if form == 0 else "The legs of a person wearing"
        return f"{lead} {_join(items)}."
    raise ValueError(f"unknown granularity {part!r}; expected one of {GRANULARITIES}")


def caption(attrs: dict, granularity: str, rng: np.random.Generator) -> str:
    """One random caption of ``attrs`` at ``granularity`` (``global`` | ``head`` | ``upper`` | ``legs``)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")
    missing = [p for p in PARTS if not isinstance(attrs.get(p), dict)]
    if missing:
        raise ValueError(f"attribute dict lacks the part(s) {missing} (keys: {sorted(attrs)})")
    if granularity == "global":
        return _global_caption(attrs, rng)
    return _part_caption(attrs, granularity, rng)


class _Reads(dict):
    """A part's attribute dict that records which keys the caption functions read."""

    def __init__(self, part: str, values: dict, log: set) -> None:
        super().__init__(values)
        self._part, self._log = part, log

    def __getitem__(self, key):
        self._log.add((self._part, key))
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._log.add((self._part, key))
        return super().get(key, default)


def caption_facts(attrs: dict, granularity: str, rng: np.random.Generator) -> tuple[str, frozenset]:
    """:func:`caption` and the facts it rests on: the ``(part, key)`` attributes the caption read to say what it
    says (the values it names, and those that decided what it leaves out, e.g. "no hat"). The caption is true of
    every identity that has the same values at those keys (:func:`facts_true_of`). Same text and random draws as
    :func:`caption` with the same ``rng``."""
    log: set = set()
    recorded = {**attrs, **{p: _Reads(p, attrs[p], log) for p in PARTS if isinstance(attrs.get(p), dict)}}
    text = caption(recorded, granularity, rng)
    return text, frozenset(log)


def facts_true_of(facts: frozenset, source: dict, other: dict) -> bool:
    """Whether a caption of ``source`` resting on ``facts`` (:func:`caption_facts`) is true of ``other``."""
    return all(source[p].get(k) == other[p].get(k) for p, k in facts)


HARD_NEGATIVE_SWAPS: dict[tuple[str, str], tuple[str, ...]] = {
    ("head", "hair"): HAIR_COLORS, ("head", "hair_length"): ("long", "short", "bald"),
    ("head", "hat"): ("none", "cap", "beanie"), ("head", "hat_color"): GARMENT_COLORS,
    ("upper", "garment"): GARMENT_COLORS, ("upper", "pattern"): ("plain", "stripes", "checks", "logo"),
    ("upper", "pattern_color"): GARMENT_COLORS, ("upper", "logo_shape"): ("circle", "triangle", "star"),
    ("upper", "sleeves"): ("short", "long"), ("upper", "bag"): ("none", "backpack", "shoulder_bag"),
    ("upper", "bag_color"): BAG_COLORS,
    ("legs", "lower"): ("trousers", "shorts", "skirt"), ("legs", "lower_color"): LOWER_COLORS,
    ("legs", "shoes"): SHOE_COLORS,
}
"""The attributes a hard negative may change, with the values it chooses from (the caption vocabulary)."""


def _swapped(attrs: dict, part: str, key: str, value: str, rng: np.random.Generator) -> dict:
    """``attrs`` with ``attrs[part][key] = value``, and what the new value needs (a hat's or bag's colour, a
    pattern's colour and logo shape) filled in or cleared."""
    p = {**attrs[part], key: value}
    if key in ("hat", "bag"):
        colours = GARMENT_COLORS if key == "hat" else BAG_COLORS
        if value == "none":
            p[f"{key}_color"] = None
        elif not p.get(f"{key}_color"):
            p[f"{key}_color"] = colours[int(rng.integers(len(colours)))]
    if key == "pattern":
        if value == "plain":
            p["pattern_color"], p["logo_shape"] = None, None
        else:
            if not p.get("pattern_color"):
                p["pattern_color"] = GARMENT_COLORS[int(rng.integers(len(GARMENT_COLORS)))]
            if value == "logo" and not p.get("logo_shape"):
                shapes = HARD_NEGATIVE_SWAPS[("upper", "logo_shape")]
                p["logo_shape"] = shapes[int(rng.integers(len(shapes)))]
    return {**attrs, part: p}


def _one_edit(text: str, other: str, longest: int = 6) -> bool:
    """Whether ``other`` is ``text`` with one span of at most ``longest`` words replaced by another non-empty one
    (a dropped phrase says less, not something false)."""
    a, b = text.rstrip(".").split(), other.rstrip(".").split()
    head = 0
    while head < min(len(a), len(b)) and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < min(len(a), len(b)) - head and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    span_a, span_b = len(a) - head - tail, len(b) - head - tail
    return 0 < span_a <= longest and 0 < span_b <= longest


def hard_negative_caption(attrs: dict, granularity: str, rng: np.random.Generator, count: int = 1,
                          tries: int = 4) -> tuple[str, frozenset, list[str]]:
    """:func:`caption_facts` plus up to ``count`` hard negatives (NegCLIP-style): the same sentence, drawn with the
    same random draws, of the identity with one attribute the caption names changed to another value ("... in red
    shoes." -> "... in white shoes."). ``(text, facts, negatives)``: each negative differs from the caption and the
    others and is false of ``attrs``; fewer when the caption names little :data:`HARD_NEGATIVE_SWAPS` can change
    (``tries`` draws per negative)."""
    replay = copy.deepcopy(rng)
    text, facts = caption_facts(attrs, granularity, rng)
    path = rng.bit_generator.state
    keys = sorted(f for f in facts if f in HARD_NEGATIVE_SWAPS)
    negatives: list[str] = []
    for _ in range(int(tries) * int(count) if keys else 0):
        if len(negatives) >= count:
            break
        part, key = keys[int(rng.integers(len(keys)))]
        values = [v for v in HARD_NEGATIVE_SWAPS[(part, key)] if v != attrs[part].get(key)]
        other = _swapped(attrs, part, key, values[int(rng.integers(len(values)))], rng)
        draws = copy.deepcopy(replay)
        negative, neg_facts = caption_facts(other, granularity, draws)
        # the same sentence: the same random decisions taken (a changed value can change the draws, as "no hat"
        # -> "a cap" does; such a sentence is another caption that may say nothing false of the person), and
        # what differs is a value the negative names
        if (negative not in negatives and draws.bit_generator.state == path and _one_edit(text, negative)
                and not facts_true_of(neg_facts, other, attrs)):
            negatives.append(negative)
    return text, facts, negatives


def captions(attrs: dict, seed: int = 0, per_granularity: int = 3) -> dict[str, list[str]]:
    """``per_granularity`` captions of each granularity (duplicates possible), deterministic in ``seed``."""
    rng = np.random.default_rng(int(seed))
    return {g: [caption(attrs, g, rng) for _ in range(int(per_granularity))] for g in GRANULARITIES}


# ---------------------------------------------------------------------------------------------
# zero-shot attribute retrieval

@dataclass(frozen=True)
class ZeroShotAttribute:
    """One classifiable attribute: its part, its values, the value of an identity, and its phrase.

    value_of(attrs) -> the identity's value, or None when the attribute does not apply (hair
    colour of a bald person, trouser colour of a skirt). phrase(value) -> the noun phrase;
    ``prep`` joins it to "a person" (``with`` / ``in``).
    """

    part: str
    values: tuple[str, ...]
    value_of: Callable[[dict], str | None]
    phrase: Callable[[str], str]
    prep: str


def _hair_color(a: dict) -> str | None:
    return None if a["head"].get("hair_length") == "bald" else a["head"]["hair"]


def _trouser_color(a: dict) -> str | None:
    return a["legs"]["lower_color"] if a["legs"].get("lower") == "trousers" else None


ZERO_SHOT_ATTRIBUTES: dict[str, ZeroShotAttribute] = {
    "hair_color": ZeroShotAttribute("head", HAIR_COLORS, _hair_color, lambda v: f"{color_word(v)} hair", "with"),
    "hair_length": ZeroShotAttribute("head", ("long", "short", "bald"), lambda a: a["head"]["hair_length"],
                                     lambda v: "a bald head" if v == "bald" else f"{v} hair", "with"),
    "hat": ZeroShotAttribute("head", ("none", "cap", "beanie"), lambda a: a["head"].get("hat", "none"),
                             lambda v: "no hat" if v == "none" else _a(v), "with"),
    "upper_color": ZeroShotAttribute("upper", GARMENT_COLORS, lambda a: a["upper"]["garment"],
                                     lambda v: _a(f"{color_word(v)} shirt"), "in"),
    "pattern": ZeroShotAttribute("upper", ("plain", "stripes", "checks", "logo"), lambda a: a["upper"]["pattern"],
                                 lambda v: {"plain": "a plain shirt", "stripes": "a striped shirt",
                                            "checks": "a checked shirt", "logo": "a shirt with a logo"}[v], "in"),
    "bag": ZeroShotAttribute("upper", ("none", "backpack", "shoulder_bag"), lambda a: a["upper"].get("bag", "none"),
                             lambda v: "no bag" if v == "none" else _a(color_word(v)), "with"),
    "lower_type": ZeroShotAttribute("legs", ("trousers", "shorts", "skirt"), lambda a: a["legs"]["lower"],
                                    lambda v: "a skirt" if v == "skirt" else v, "in"),
    "trouser_color": ZeroShotAttribute("legs", LOWER_COLORS, _trouser_color,
                                       lambda v: "blue jeans" if v == "jeans" else f"{color_word(v)} trousers", "in"),
    "shoe_color": ZeroShotAttribute("legs", SHOE_COLORS, lambda a: a["legs"]["shoes"],
                                    lambda v: f"{color_word(v)} shoes", "in"),
}
"""The attributes of the zero-shot retrieval report (trouser colour only over people in trousers)."""


def attribute_value(attrs: dict, attribute: str) -> str | None:
    """The value of ``attribute`` (a key of :data:`ZERO_SHOT_ATTRIBUTES`) for an identity, or None."""
    if attribute not in ZERO_SHOT_ATTRIBUTES:
        raise KeyError(f"unknown attribute {attribute!r}; expected one of {sorted(ZERO_SHOT_ATTRIBUTES)}")
    return ZERO_SHOT_ATTRIBUTES[attribute].value_of(attrs)


def zero_shot_prompts(attribute: str, granularity: str = "global") -> dict[str, str]:
    """value -> prompt for ``attribute``: ``global`` = "A photo of a person in a red shirt.",
    ``part`` = the attribute's part: "A photo of the upper body of a person in a red shirt."."""
    if attribute not in ZERO_SHOT_ATTRIBUTES:
        raise KeyError(f"unknown attribute {attribute!r}; expected one of {sorted(ZERO_SHOT_ATTRIBUTES)}")
    spec = ZERO_SHOT_ATTRIBUTES[attribute]
    if granularity == "global":
        lead = "A photo of a person"
    elif granularity == "part":
        lead = f"A photo of the {PART_NOUNS[spec.part]} of a person"
    else:
        raise ValueError(f"granularity must be 'global' or 'part', got {granularity!r}")
    out = {}
    for v in spec.values:
        ph = spec.phrase(v)
        if ph.startswith("no "):
            out[v] = f"{lead} without {_a(ph[3:])}."
        else:
            out[v] = f"{lead} {spec.prep} {ph}."
    return out
