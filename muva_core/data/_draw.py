"""Procedural drawing of one pedestrian image: background, person, occluder, camera style.

Everything is drawn with PIL at ``SUPERSAMPLE`` times the output size and reduced at the end
(anti-aliasing). Each drawn shape is recorded in a *shape-id map*; a lookup table maps shape
ids to part labels (0 = not the person, 1 head, 2 upper body, 3 legs). The map gives the
outlines (edges between shapes), the person mask for shading, and the per-part pixel counts
before and after occluders (the ``visible`` fraction). Part boxes come from the geometry of
the shapes (exact, before clipping), not from pixels.

Body coordinates: unit = person height, x = 0 at the body centre line, y = 0 at the top of the
head and 1 at the soles. The identity attributes (see :mod:`muva_core.data.synthetic`) carry
RGB colours, so this module knows nothing about palettes.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from .samples import PARTS

IMAGE_SIZE: tuple[int, int] = (256, 128)
"""Default output size (H, W), the Re-ID input size of the paper."""

SUPERSAMPLE = 2
PART_LABELS: dict[str, int] = {"head": 1, "upper": 2, "legs": 3}
HIP_Y = 0.52

RGB = tuple[int, int, int]


class GTBox(NamedTuple):
    """Ground truth of one part: box in output pixels (x1, y1 exclusive, clipped to the image)
    and the visible fraction of the part (inside the frame and not covered by an occluder)."""

    x0: float
    y0: float
    x1: float
    y1: float
    visible: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)


# ---------------------------------------------------------------------------------------------
# colour helpers

def _c(rgb: Any, k: float = 1.0, add: float = 0.0) -> RGB:
    return tuple(int(max(0, min(255, round(v * k + add)))) for v in rgb)  # type: ignore[return-value]


def _mix(a: Any, b: Any, t: float) -> RGB:
    return tuple(int(round(x * (1 - t) + y * t)) for x, y in zip(a, b))  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# the scene: a list of shapes in canvas pixels, each with a shape id and a part label

class _Scene:
    def __init__(self) -> None:
        self.ops: list[tuple] = []
        self.ext: dict[str, list[float]] = {}
        self.part_of: list[int] = [0]  # shape id -> part label; id 0 = background
        self.n_person_ids = 0

    def new_id(self, part: str | None) -> int:
        self.part_of.append(PART_LABELS.get(part, 0) if part else 0)
        if len(self.part_of) > 255:
            raise RuntimeError("too many shapes in one image")
        return len(self.part_of) - 1

    def _track(self, part: str | None, xs: list[float], ys: list[float]) -> None:
        if part is None:
            return
        e = self.ext.get(part)
        b = [min(xs), min(ys), max(xs), max(ys)]
        self.ext[part] = b if e is None else [min(e[0], b[0]), min(e[1], b[1]), max(e[2], b[2]), max(e[3], b[3])]

    def poly(self, pts, fill: RGB, part: str | None, sid: int | None = None, track: bool = True) -> int:
        sid = self.new_id(part) if sid is None else sid
        pts = [(float(x), float(y)) for x, y in pts]
        self.ops.append(("poly", pts, fill, sid))
        if track:
            self._track(part, [p[0] for p in pts], [p[1] for p in pts])
        return sid

    def ellipse(self, cx, cy, rx, ry, fill: RGB, part: str | None, sid: int | None = None, track: bool = True) -> int:
        sid = self.new_id(part) if sid is None else sid
        box = (float(cx - rx), float(cy - ry), float(cx + rx), float(cy + ry))
        self.ops.append(("ellipse", box, fill, sid))
        if track:
            self._track(part, [box[0], box[2]], [box[1], box[3]])
        return sid

    def chord(self, cx, cy, rx, ry, start, end, fill: RGB, part: str | None, sid: int | None = None) -> int:
        """Part of an ellipse cut by a chord; angles in degrees, PIL convention (clockwise from +x)."""
        sid = self.new_id(part) if sid is None else sid
        box = (float(cx - rx), float(cy - ry), float(cx + rx), float(cy + ry))
        self.ops.append(("chord", box, fill, sid, float(start), float(end)))
        angs = np.radians(np.linspace(start, end, 13))
        self._track(part, list(cx + rx * np.cos(angs)), list(cy + ry * np.sin(angs)))
        return sid

    def limb(self, p0, p1, w0, w1, fill: RGB, part: str | None, sid: int | None = None, caps=(True, True),
             track: bool = True) -> int:
        """A tapered segment with round ends: one shape id, so no outline at the joints."""
        sid = self.new_id(part) if sid is None else sid
        dx, dy = p1[0] - p0[0], p1[1] - p0[1]
        n = math.hypot(dx, dy) or 1.0
        nx, ny = -dy / n, dx / n
        if caps[0]:
            self.ellipse(p0[0], p0[1], w0 / 2, w0 / 2, fill, part, sid, track)
        if caps[1]:
            self.ellipse(p1[0], p1[1], w1 / 2, w1 / 2, fill, part, sid, track)
        quad = [(p0[0] + nx * w0 / 2, p0[1] + ny * w0 / 2), (p1[0] + nx * w1 / 2, p1[1] + ny * w1 / 2),
                (p1[0] - nx * w1 / 2, p1[1] - ny * w1 / 2), (p0[0] - nx * w0 / 2, p0[1] - ny * w0 / 2)]
        self.poly(quad, fill, part, sid, track)
        return sid

    def detail(self, cx, cy, rx, ry, fill: RGB) -> None:
        """A small ellipse (eyes, mouth) drawn on the RGB image only: no outline, no box."""
        self.ops.append(("detail", (float(cx - rx), float(cy - ry), float(cx + rx), float(cy + ry)), fill, 0))

    def pattern(self, mask_pts, kind: str, color: RGB, period: float, phase: float) -> None:
        """Stripes or checks clipped to a polygon (drawn on the RGB image only)."""
        self.ops.append(("pattern", [(float(x), float(y)) for x, y in mask_pts], color, 0, kind, period, phase))

    def render(self, img: Image.Image, ids: Image.Image, start: int = 0) -> None:
        draw, idraw = ImageDraw.Draw(img), ImageDraw.Draw(ids)
        for op in self.ops[start:]:
            kind, geom, fill, sid = op[:4]
            if kind == "poly":
                draw.polygon(geom, fill=fill)
                idraw.polygon(geom, fill=sid)
            elif kind == "ellipse":
                draw.ellipse(geom, fill=fill)
                idraw.ellipse(geom, fill=sid)
            elif kind == "chord":
                draw.chord(geom, op[4], op[5], fill=fill)
                idraw.chord(geom, op[4], op[5], fill=sid)
            elif kind == "detail":
                draw.ellipse(geom, fill=fill)
            elif kind == "pattern":
                _draw_pattern(img, geom, fill, op[4], op[5], op[6])


def _draw_pattern(img: Image.Image, pts, color: RGB, kind: str, period: float, phase: float) -> None:
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, y0 = max(0, int(min(xs))), max(0, int(min(ys)))
    x1, y1 = min(img.width, int(math.ceil(max(xs))) + 1), min(img.height, int(math.ceil(max(ys))) + 1)
    if x1 <= x0 or y1 <= y0:
        return
    w, h = x1 - x0, y1 - y0
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).polygon([(x - x0, y - y0) for x, y in pts], fill=255)
    pat = Image.new("L", (w, h), 0)
    pd = ImageDraw.Draw(pat)
    p = max(3.0, period)
    if kind == "stripes":
        y = y0 - (y0 % p) + phase * p - p
        while y < y1:
            pd.rectangle((0, y - y0, w, y - y0 + 0.45 * p), fill=255)
            y += p
    elif kind == "checks":
        gx0 = x0 - (x0 % p) + phase * p - p
        gy0 = y0 - (y0 % p) - p
        j = 0
        y = gy0
        while y < y1:
            i = j % 2
            x = gx0 + i * p
            while x < x1:
                pd.rectangle((x - x0, y - y0, x - x0 + p - 1, y - y0 + p - 1), fill=255)
                x += 2 * p
            y += p
            j += 1
        # thin grid lines in the garment colour's complement make it read as plaid
        y = gy0
        while y < y1:
            pd.line((0, y - y0 + p / 2, w, y - y0 + p / 2), fill=160, width=1)
            y += p
    img.paste(color, (x0, y0, x1, y1), ImageChops.multiply(pat, mask))


# ---------------------------------------------------------------------------------------------
# pose

def sample_pose(rng: np.random.Generator, kind: str = "normal", style: dict | None = None) -> dict:
    """Draw the per-image nuisance: view, walking direction, stride, arm swing, lean, framing, occluder.

    kind: ``normal`` (a tight detection), ``distractor`` (a loose, off-centre detection) or
    ``junk`` (a bad crop that cuts part of the body off).
    """
    style = style or {}
    stride = float(rng.uniform(0.0, 22.0))
    pose = {
        "kind": kind,
        "view": "front" if rng.random() < 0.5 else "back",
        "direction": int(1 if rng.random() < 0.5 else -1),
        "stride": round(stride, 3),
        "arm_swing": round(float(stride * rng.uniform(0.35, 0.7)), 3),
        "elbow": round(float(rng.uniform(4.0, 22.0)), 3),
        "arm_out": round(float(rng.uniform(5.0, 10.0)), 3),
        "lean": round(float(np.clip(rng.normal(0.0, 2.0), -5.0, 5.0)), 3),
        "phase": round(float(rng.random()), 4),
    }
    scale = float(style.get("person_scale", 1.0))
    if kind == "normal":
        height = rng.uniform(0.80, 0.93) * scale
        cx = 0.5 + float(np.clip(rng.normal(0.0, 0.045), -0.11, 0.11))
        foot = rng.uniform(0.955, 0.99)
    elif kind == "distractor":
        height = rng.uniform(0.55, 0.88) * scale
        cx = 0.5 + rng.uniform(-0.22, 0.22)
        foot = rng.uniform(0.8, 1.0)
    elif kind == "junk":
        height = rng.uniform(1.3, 2.1)
        cx = 0.5 + rng.uniform(-0.28, 0.28)
        foot = 1.0 + (height - 1.0) * rng.uniform(0.0, 1.0)  # some of the top or the bottom is cut off
    else:
        raise ValueError(f"unknown pose kind {kind!r} (expected normal, distractor or junk)")
    pose.update(height=round(float(height), 4), cx=round(float(cx), 4), foot=round(float(foot), 4))
    p_occ = float(style.get("occlusion", 0.12))
    occ = None
    if kind != "junk" and rng.random() < p_occ:
        t = ["pole", "box", "object"][int(rng.choice(3, p=[0.35, 0.35, 0.3]))]
        occ = {"type": t, "u": round(float(rng.random()), 4), "v": round(float(rng.random()), 4),
               "w": round(float(rng.random()), 4), "tone": round(float(rng.random()), 4)}
    pose["occluder"] = occ
    return pose


# ---------------------------------------------------------------------------------------------
# the person

def _rot(x: float, y: float, a: float, cy: float) -> tuple[float, float]:
    """Rotate (x, y) around (0, cy) by a radians (positive leans the top towards +x)."""
    dy = y - cy
    ca, sa = math.cos(a), math.sin(a)
    return (x * ca - dy * sa, cy + x * sa + dy * ca)


def _build_person(sc: _Scene, attrs: dict, pose: dict, fx: float, fy: float, u: float) -> dict:
    """Add the person's shapes to the scene. (fx, fy) = canvas position of the soles' centre, u = height in px."""
    head, upper, legs = attrs["head"], attrs["upper"], attrs["legs"]
    body = attrs.get("body", {})
    wf = float(body.get("width", 1.0))
    d = int(pose.get("direction", 1))
    front = pose.get("view", "front") == "front"
    lean = math.radians(float(pose.get("lean", 0.0)))
    s = math.radians(float(pose.get("stride", 10.0)))
    sw = math.radians(float(pose.get("arm_swing", 5.0)))
    eb = math.radians(float(pose.get("elbow", 10.0)))
    ao = math.radians(float(pose.get("arm_out", 7.0)))

    skin = tuple(head["skin_rgb"])
    hair = tuple(head["hair_rgb"])
    garment = tuple(upper["garment_rgb"])
    lower = tuple(legs["lower_rgb"])
    shoes = tuple(legs["shoes_rgb"])

    # legs first: they fix where the soles are
    hip_l, hip_r = (-0.046 * wf, 0.53), (0.046 * wf, 0.53)
    lt, ls = 0.225, 0.218

    def leg(hip, ta, sa):
        knee = (hip[0] + lt * math.sin(ta), hip[1] + lt * math.cos(ta))
        ankle = (knee[0] + ls * math.sin(sa), knee[1] + ls * math.cos(sa))
        return hip, knee, ankle

    # front leg swings towards the walking direction, back leg pushes off (heel up)
    front_hip, back_hip = (hip_r, hip_l) if d > 0 else (hip_l, hip_r)
    leg_f = leg(front_hip, d * s, d * s * 0.45)
    leg_b = leg(back_hip, -d * s * 0.85, -d * s * 1.45)
    sole = max(leg_f[2][1], leg_b[2][1]) + 0.036
    shift = 1.0 - sole

    def T(p) -> tuple[float, float]:
        return (fx + p[0] * u, fy - u + (p[1] + shift) * u)

    def TL(p) -> tuple[float, float]:  # leaning upper body
        return T(_rot(p[0], p[1], lean, HIP_Y))

    px = lambda v: v * u  # noqa: E731

    lt_type = legs["lower"]
    leg_cover = lower if lt_type in ("trousers", "shorts") else skin
    for k, (hip, knee, ankle) in enumerate((leg_b, leg_f)):
        shade = 0.82 if k == 0 else 1.0
        cov = _c(leg_cover, shade)
        if lt_type == "trousers":
            sid = sc.limb(T(hip), T(knee), px(0.082 * wf), px(0.062 * wf), cov, "legs")
            sc.limb(T(knee), T(ankle), px(0.062 * wf), px(0.05 * wf), cov, "legs", sid)
        else:
            sid = sc.limb(T(hip), T(knee), px(0.07 * wf), px(0.052 * wf), _c(skin, shade), "legs")
            sc.limb(T(knee), T(ankle), px(0.052 * wf), px(0.04 * wf), _c(skin, shade), "legs", sid)
            if lt_type == "shorts":
                mid = (hip[0] + 0.62 * (knee[0] - hip[0]), hip[1] + 0.62 * (knee[1] - hip[1]))
                sc.limb(T(hip), T(mid), px(0.084 * wf), px(0.07 * wf), cov, "legs", caps=(True, False))
        shoe_c = (ankle[0] + d * 0.016, ankle[1] + 0.016)
        rx = 0.036 if front else 0.032
        sc.ellipse(*T(shoe_c), px(rx), px(0.021), _c(shoes, shade), "legs")
    if lt_type in ("trousers", "shorts"):
        sc.poly([T(p) for p in ((-0.094 * wf, 0.49), (0.094 * wf, 0.49), (0.09 * wf, 0.585), (-0.09 * wf, 0.585))],
                lower, "legs")
    else:  # skirt
        sc.poly([T(p) for p in ((-0.09 * wf, 0.49), (0.09 * wf, 0.49), (0.15 * wf, 0.73), (-0.15 * wf, 0.73))],
                lower, "legs")

    # backpack seen from the front peeks out beside the torso
    bag, bag_rgb = upper.get("bag", "none"), tuple(upper.get("bag_rgb") or (40, 40, 40))
    if bag == "backpack" and front:
        sc.poly([TL(p) for p in ((-0.128 * wf, 0.2), (0.128 * wf, 0.2), (0.124 * wf, 0.43), (-0.124 * wf, 0.43))],
                _c(bag_rgb, 0.8), "upper")

    # neck (head label, but not part of the head box)
    sc.limb(TL((0, 0.115)), TL((0, 0.175)), px(0.046), px(0.05), _c(skin, 0.9), "head", track=False)

    # torso
    sh = 0.108 * wf
    torso = [(-0.045 * wf, 0.152), (0.045 * wf, 0.152), (sh, 0.168), (sh + 0.014, 0.2), (0.096 * wf, 0.34),
             (0.088 * wf, 0.45), (0.096 * wf, 0.565), (-0.096 * wf, 0.565), (-0.088 * wf, 0.45),
             (-0.096 * wf, 0.34), (-sh - 0.014, 0.2), (-sh, 0.168)]
    torso_px = [TL(p) for p in torso]
    sc.poly(torso_px, garment, "upper")
    pattern = upper.get("pattern", "plain")
    pcol = tuple(upper.get("pattern_rgb") or (255, 255, 255))
    if pattern in ("stripes", "checks"):
        sc.pattern(torso_px, pattern, pcol, px(0.042 if pattern == "stripes" else 0.04), float(pose.get("phase", 0.0)))
    elif pattern == "logo" and front:
        lc = TL((0.028 * wf * -d, 0.27))
        shape = upper.get("logo_shape", "circle")
        r = px(0.034)
        if shape == "circle":
            sc.ellipse(lc[0], lc[1], r, r, pcol, "upper")
        elif shape == "triangle":
            sc.poly([(lc[0], lc[1] - r), (lc[0] + r, lc[1] + 0.8 * r), (lc[0] - r, lc[1] + 0.8 * r)], pcol, "upper")
        else:  # star
            pts = []
            for i in range(10):
                a = -math.pi / 2 + i * math.pi / 5
                rr = r * (1.15 if i % 2 == 0 else 0.5)
                pts.append((lc[0] + rr * math.cos(a), lc[1] + rr * math.sin(a)))
            sc.poly(pts, pcol, "upper")
    if front:  # V collar
        sc.poly([TL(p) for p in ((-0.028, 0.152), (0.028, 0.152), (0, 0.19))], _c(skin, 0.95), "upper", track=False)

    # bags
    if bag == "backpack":
        if front:
            for sx in (-1, 1):
                sc.limb(TL((sx * 0.062 * wf, 0.16)), TL((sx * 0.078 * wf, 0.37)), px(0.022), px(0.02), _c(bag_rgb, 0.9), "upper")
        else:
            sc.poly([TL(p) for p in ((-0.088 * wf, 0.19), (0.088 * wf, 0.19), (0.094 * wf, 0.44), (-0.094 * wf, 0.44))],
                    bag_rgb, "upper")
            sc.poly([TL(p) for p in ((-0.065 * wf, 0.34), (0.065 * wf, 0.34), (0.068 * wf, 0.43), (-0.068 * wf, 0.43))],
                    _c(bag_rgb, 0.78), "upper")
    elif bag == "shoulder_bag":
        side = 1 if upper.get("bag_side", "right") == "right" else -1
        if not front:
            side = -side
        sc.limb(TL((-side * 0.07 * wf, 0.165)), TL((side * 0.115 * wf, 0.47)), px(0.014), px(0.014), _c(bag_rgb, 0.85), "upper")
        sc.poly([TL(p) for p in ((side * 0.095 * wf, 0.455), (side * 0.175 * wf, 0.455),
                                 (side * 0.172 * wf, 0.575), (side * 0.098 * wf, 0.575))], bag_rgb, "upper")

    # arms
    sleeve = upper.get("sleeves", "long")
    for side in (-1, 1):
        shoulder = (side * (sh - 0.008), 0.19)
        ua = side * ao + (d * sw if side < 0 else -d * sw)
        fa = ua + d * eb
        elbow = (shoulder[0] + 0.165 * math.sin(ua), shoulder[1] + 0.165 * math.cos(ua))
        wrist = (elbow[0] + 0.152 * math.sin(fa), elbow[1] + 0.152 * math.cos(fa))
        S, E, W = TL(shoulder), TL(elbow), TL(wrist)
        armc = _c(garment, 0.9) if sleeve == "long" else _c(skin, 0.95)
        sid = sc.limb(S, E, px(0.056 * wf), px(0.044 * wf), armc, "upper")
        sc.limb(E, W, px(0.044 * wf), px(0.036 * wf), armc, "upper", sid)
        if sleeve == "short":
            m = (shoulder[0] + 0.55 * (elbow[0] - shoulder[0]), shoulder[1] + 0.55 * (elbow[1] - shoulder[1]))
            sc.limb(S, TL(m), px(0.064 * wf), px(0.056 * wf), _c(garment, 0.93), "upper", caps=(True, False))
        hand = (wrist[0] + 0.018 * math.sin(fa), wrist[1] + 0.018 * math.cos(fa))
        H = TL(hand)
        sc.ellipse(H[0], H[1], px(0.021), px(0.024), skin, "upper")

    # head: hair behind, head, face, hair in front, hat
    hc = (0.0, 0.072)
    hrx, hry = 0.05 * float(body.get("head", 1.0)), 0.064 * float(body.get("head", 1.0))
    C = TL(hc)
    hl = head.get("hair_length", "short")
    if hl == "long" and front:  # hair falling behind the face down to the shoulders
        sc.poly([TL(p) for p in ((-hrx * 1.05, 0.07), (hrx * 1.05, 0.07), (hrx * 1.28, 0.16), (hrx * 1.15, 0.215),
                                 (-hrx * 1.15, 0.215), (-hrx * 1.28, 0.16))], _c(hair, 0.8), "head")
    if front:
        if hl != "bald":
            sc.ellipse(C[0], C[1] - px(0.007), px(hrx * 1.07), px(hry * 0.98), hair, "head")
            sc.ellipse(C[0], C[1] + px(0.012), px(hrx * 0.96), px(hry * 0.84), skin, "head")
        else:
            sc.ellipse(C[0], C[1], px(hrx), px(hry), skin, "head")
        for ex in (-0.018, 0.018):
            e = TL((ex + d * 0.004, hc[1] + 0.006))
            sc.detail(e[0], e[1], px(0.0055), px(0.0045), (45, 35, 30))
        m = TL((d * 0.004, hc[1] + 0.036))
        sc.detail(m[0], m[1], px(0.012), px(0.0035), _c(skin, 0.7))
    else:
        sc.ellipse(C[0], C[1], px(hrx), px(hry), hair if hl != "bald" else skin, "head")
        if hl == "long":
            hs = sc.poly([TL(p) for p in ((-hrx * 1.0, 0.07), (hrx * 1.0, 0.07), (hrx * 1.22, 0.17), (hrx * 1.05, 0.225),
                                          (-hrx * 1.05, 0.225), (-hrx * 1.22, 0.17))], hair, "head")
            b = TL((0.0, 0.225))
            sc.ellipse(b[0], b[1], px(hrx * 1.05), px(0.018), hair, "head", hs)
    hat = head.get("hat", "none")
    if hat and hat != "none":
        hat_rgb = tuple(head.get("hat_rgb") or (60, 60, 60))
        if hat == "cap":
            sc.chord(C[0], C[1] - px(0.012), px(hrx * 1.1), px(hry * 0.82), 180, 360, hat_rgb, "head")
            if front:
                sc.ellipse(C[0] + px(d * 0.01), C[1] - px(0.012), px(hrx * 1.35), px(0.011), _c(hat_rgb, 0.8), "head")
            else:
                sc.poly([(C[0] - px(hrx * 1.1), C[1] - px(0.016)), (C[0] + px(hrx * 1.1), C[1] - px(0.016)),
                         (C[0] + px(hrx * 1.1), C[1] - px(0.008)), (C[0] - px(hrx * 1.1), C[1] - px(0.008))],
                        _c(hat_rgb, 0.8), "head")
        else:  # beanie
            sc.chord(C[0], C[1] - px(0.014), px(hrx * 1.1), px(hry * 0.95), 180, 360, hat_rgb, "head")
            sc.poly([(C[0] - px(hrx * 1.12), C[1] - px(0.022)), (C[0] + px(hrx * 1.12), C[1] - px(0.022)),
                     (C[0] + px(hrx * 1.12), C[1] - px(0.008)), (C[0] - px(hrx * 1.12), C[1] - px(0.008))],
                    _c(hat_rgb, 0.82), "head")
    return {"hip_x": T((0, HIP_Y))[0], "feet": (T(leg_f[2]), T(leg_b[2]))}




# ---------------------------------------------------------------------------------------------
# backgrounds: a fixed layout per camera (a panorama seen with a per-image offset) plus clutter

def _rect(draw: ImageDraw.ImageDraw, x0, y0, x1, y1, fill, P: float, W: int) -> None:
    """Draw a panorama rectangle wrapped around the panorama width P."""
    for sh in (0.0, -P, P):
        a, b = x0 + sh, x1 + sh
        if b >= 0 and a <= W:
            draw.rectangle((a, y0, b, y1), fill=fill)


def _gradient(h: int, w: int, top: Any, bottom: Any, y0: int, y1: int, arr: np.ndarray) -> None:
    if y1 <= y0:
        return
    t = np.linspace(0.0, 1.0, y1 - y0)[:, None]
    col = (np.asarray(top, np.float64)[None, :] * (1 - t) + np.asarray(bottom, np.float64)[None, :] * t).astype(np.uint8)
    arr[y0:y1] = col[:, None, :]


def _draw_background(style: dict, rng: np.random.Generator, W: int, H: int) -> Image.Image:
    kind = style.get("background", "plain")
    wall, ground = tuple(style.get("wall_rgb", (150, 150, 150))), tuple(style.get("ground_rgb", (110, 110, 110)))
    accents = [tuple(a) for a in style.get("accents_rgb", [(120, 90, 70), (70, 90, 120), (140, 60, 60)])]
    hz = int(H * float(style.get("horizon", 0.62)) + rng.integers(-H // 40, H // 40 + 1))
    arr = np.empty((H, 1, 3), np.uint8)  # one column, stretched
    _gradient(H, W, _c(wall, 1.08), _c(wall, 0.9), 0, hz, arr)
    _gradient(H, W, _c(ground, 0.92), _c(ground, 1.1), hz, H, arr)
    sky_end = int(hz - 0.3 * H)
    if kind == "campus":
        _gradient(H, W, (200, 215, 230), (225, 230, 232), 0, max(1, sky_end), arr)
    img = Image.fromarray(arr, "RGB").resize((W, H), Image.NEAREST)
    if kind == "plain":
        return img
    draw = ImageDraw.Draw(img)
    lay = np.random.default_rng(int(style.get("layout_seed", 0)))
    P = 4.0 * W
    off = float(rng.uniform(0, P))

    if kind == "indoor":
        for _ in range(9):
            x = lay.uniform(0, P) - off
            t = lay.integers(4)
            a = accents[int(lay.integers(len(accents)))]
            if t == 0:  # door
                w = W * lay.uniform(0.32, 0.45)
                _rect(draw, x, hz - 0.42 * H, x + w, hz, _c(a, 0.8), P, W)
                _rect(draw, x + 0.06 * w, hz - 0.4 * H, x + 0.94 * w, hz, _c(a, 0.95), P, W)
                _rect(draw, x + 0.8 * w, hz - 0.22 * H, x + 0.86 * w, hz - 0.2 * H, (200, 190, 150), P, W)
            elif t == 1:  # poster
                w = W * lay.uniform(0.2, 0.35)
                y = hz - H * lay.uniform(0.3, 0.42)
                _rect(draw, x, y, x + w, y + 0.16 * H, a, P, W)
                _rect(draw, x + 0.15 * w, y + 0.03 * H, x + 0.85 * w, y + 0.09 * H, _c(a, 1.4, 30), P, W)
            elif t == 2:  # pillar
                w = W * lay.uniform(0.18, 0.3)
                _rect(draw, x, 0, x + w, hz, _c(wall, 1.12), P, W)
                _rect(draw, x + w * 0.85, 0, x + w, hz, _c(wall, 0.85), P, W)
            else:  # window
                w = W * lay.uniform(0.3, 0.5)
                y = hz - H * lay.uniform(0.45, 0.55)
                _rect(draw, x, y, x + w, y + 0.25 * H, _c(wall, 0.7), P, W)
                _rect(draw, x + 4, y + 4, x + w - 4, y + 0.25 * H - 4, (170, 195, 215), P, W)
        lc = _c(ground, 0.8)
        draw.rectangle((0, hz - 3, W, hz + 2), fill=_c(wall, 0.6))
        for k in range(1, 9):
            y = hz + (H - hz) * (k / 9) ** 1.5
            draw.line((0, y, W, y), fill=lc, width=2)
        vx = W / 2 + float(rng.uniform(-W, W))
        for k in range(-8, 9):
            draw.line((vx + k * W * 0.12, hz, vx + k * W * 0.5, H), fill=lc, width=2)
    elif kind == "street_night":
        for col in range(int(P / (0.3 * W)) + 1):
            xb = col * 0.3 * W - off
            for row in range(int(max(1, hz - 0.08 * H) / (0.13 * H))):
                y = 0.03 * H + row * 0.13 * H
                lit = lay.random() < 0.45
                fill = _mix((255, 200, 110), accents[0], 0.25) if lit else _c(wall, 0.6)
                _rect(draw, xb, y, xb + 0.17 * W, y + 0.075 * H, fill, P, W)
        for _ in range(3):
            x = lay.uniform(0, P) - off
            _rect(draw, x, 0.05 * H, x + 0.03 * W, hz + 0.02 * H, (35, 32, 30), P, W)
            for sh in (0.0, -P, P):
                if -0.3 * W <= x + sh <= 1.3 * W:
                    draw.ellipse((x + sh - 0.14 * W, 0.02 * H, x + sh + 0.17 * W, 0.09 * H), fill=(255, 215, 140))
        draw.rectangle((0, hz, W, hz + 0.025 * H), fill=_c(ground, 1.5))
        for _ in range(4):
            y = float(rng.uniform(hz + 0.05 * H, H))
            x = float(rng.uniform(-0.2 * W, W))
            draw.ellipse((x, y, x + W * rng.uniform(0.2, 0.6), y + 0.012 * H), fill=_c(ground, 1.6, 10))
    elif kind == "campus":
        for col in range(int(P / (0.22 * W)) + 1):
            xb = col * 0.22 * W - off
            for row in range(3):
                y = sky_end + 0.03 * H + row * 0.08 * H
                _rect(draw, xb, y, xb + 0.12 * W, y + 0.045 * H, _c(wall, 0.6), P, W)
        for _ in range(7):
            x = lay.uniform(0, P) - off
            r = W * lay.uniform(0.2, 0.4)
            y = hz - H * lay.uniform(0.12, 0.3)
            g = _mix((50, 110, 50), accents[0], 0.2)
            _rect(draw, x - 0.03 * W, y, x + 0.03 * W, hz, (90, 70, 50), P, W)
            for sh in (0.0, -P, P):
                if -r <= x + sh <= W + r:
                    draw.ellipse((x + sh - r, y - r * 0.9, x + sh + r, y + r * 0.6), fill=g)
                    draw.ellipse((x + sh - r * 0.6, y - r * 1.2, x + sh + r * 0.5, y), fill=_c(g, 1.2))
        draw.rectangle((0, hz - 0.01 * H, W, hz + 0.035 * H), fill=(90, 140, 70))
        lc = _c(ground, 0.85)
        for k in range(1, 7):
            y = hz + (H - hz) * (k / 7) ** 1.4
            draw.line((0, y, W, y), fill=lc, width=2)
    elif kind == "urban":
        for k in range(int(P / (0.6 * W)) + 1):
            x = k * 0.6 * W - off
            a = accents[int(lay.integers(len(accents)))]
            _rect(draw, x, 0.05 * H, x + 0.58 * W, hz, a, P, W)
            _rect(draw, x + 0.06 * W, hz - 0.3 * H, x + 0.52 * W, hz - 0.02 * H, (40, 50, 60), P, W)
            _rect(draw, x + 0.08 * W, hz - 0.28 * H, x + 0.3 * W, hz - 0.04 * H, (70, 85, 100), P, W)
            stripe = _c(a, 1.5, 40)
            for j in range(6):
                _rect(draw, x + j * 0.097 * W, hz - 0.38 * H, x + (j + 0.5) * 0.097 * W, hz - 0.32 * H, stripe, P, W)
            _rect(draw, x + 0.1 * W, 0.1 * H, x + 0.48 * W, 0.16 * H, _c(accents[(k + 1) % len(accents)], 1.3, 20), P, W)
        for k in range(int(hz / (0.03 * H))):
            draw.line((0, k * 0.03 * H, W, k * 0.03 * H), fill=_c(wall, 0.85), width=1)
        for k in range(-2, 8):
            x = k * 0.35 * W - (off % (0.7 * W))
            draw.polygon([(x, hz + 0.05 * H), (x + 0.15 * W, hz + 0.05 * H), (x + 0.25 * W, H), (x + 0.02 * W, H)],
                         fill=_c(ground, 1.7, 30))

    # per-image clutter on the ground
    for _ in range(int(rng.poisson(float(style.get("clutter", 1.5))))):
        yb = float(rng.uniform(hz + 0.02 * H, H * 1.02))
        sz = (0.35 + 0.9 * (yb - hz) / max(1, H - hz)) * H * 0.12
        x = float(rng.uniform(-0.1 * W, 1.1 * W))
        col = _c(accents[int(rng.integers(len(accents)))], float(rng.uniform(0.6, 1.2)))
        t = int(rng.integers(4))
        if t == 0:  # bin
            draw.rectangle((x, yb - sz, x + 0.55 * sz, yb), fill=col)
            draw.rectangle((x - 0.05 * sz, yb - sz, x + 0.6 * sz, yb - 0.88 * sz), fill=_c(col, 0.7))
        elif t == 1:  # bollard
            draw.rectangle((x, yb - 0.8 * sz, x + 0.18 * sz, yb), fill=(90, 90, 95))
            draw.ellipse((x - 0.03 * sz, yb - 0.9 * sz, x + 0.21 * sz, yb - 0.72 * sz), fill=col)
        elif t == 2:  # plant
            draw.rectangle((x, yb - 0.4 * sz, x + 0.5 * sz, yb), fill=(120, 80, 55))
            draw.ellipse((x - 0.3 * sz, yb - 1.3 * sz, x + 0.8 * sz, yb - 0.3 * sz), fill=(45, 110 + int(rng.integers(40)), 45))
        else:  # a far-away passer-by
            dark = _c(col, 0.5)
            draw.rounded_rectangle((x, yb - 1.6 * sz, x + 0.45 * sz, yb - 0.1 * sz), radius=0.15 * sz, fill=dark)
            draw.ellipse((x + 0.1 * sz, yb - 1.95 * sz, x + 0.36 * sz, yb - 1.6 * sz), fill=_c(dark, 1.3, 20))
    return img


def _ground_shadow(img: Image.Image, cx: float, cy: float, rx: float, ry: float) -> None:
    x0, y0, x1, y1 = int(cx - rx), int(cy - ry), int(cx + rx) + 1, int(cy + ry) + 1
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(img.width, x1), min(img.height, y1)
    if x1 <= x0 or y1 <= y0:
        return
    m = Image.new("L", (x1 - x0, y1 - y0), 0)
    ImageDraw.Draw(m).ellipse((cx - rx - x0, cy - ry - y0, cx + rx - x0, cy + ry - y0), fill=110)
    region = img.crop((x0, y0, x1, y1))
    img.paste(Image.new("RGB", region.size, (0, 0, 0)), (x0, y0), m)


# ---------------------------------------------------------------------------------------------
# occluders

def _add_occluder(sc: _Scene, occ: dict, person_box: list[float], W: int, H: int) -> None:
    u, v, w, tone = float(occ["u"]), float(occ["v"]), float(occ["w"]), float(occ["tone"])
    px0, py0, px1, py1 = person_box
    t = occ["type"]
    if t == "pole":
        cx = px0 + (px1 - px0) * (0.15 + 0.7 * u)
        hw = W * (0.025 + 0.03 * w)
        col = [(120, 125, 130), (40, 80, 50), (150, 40, 35), (60, 60, 65)][int(tone * 4) % 4]
        sid = sc.poly([(cx - hw, -2), (cx + hw, -2), (cx + hw, H + 2), (cx - hw, H + 2)], col, None)
        sc.poly([(cx - hw * 0.5, -2), (cx - hw * 0.1, -2), (cx - hw * 0.1, H + 2), (cx - hw * 0.5, H + 2)],
                _c(col, 1.35, 15), None, sid)
    elif t == "box":
        top = py0 + (py1 - py0) * (0.58 + 0.25 * v)
        x0 = -0.25 * W + 0.75 * W * u
        x1 = x0 + W * (0.5 + 0.4 * w)
        col = [(185, 145, 95), (60, 100, 160), (200, 70, 40), (90, 90, 90)][int(tone * 4) % 4]
        sid = sc.poly([(x0, top), (x1, top), (x1, H + 2), (x0, H + 2)], col, None)
        sc.poly([(x0, top + 0.04 * H), (x1, top + 0.04 * H), (x1, top + 0.06 * H), (x0, top + 0.06 * H)],
                _c(col, 0.75), None, sid)
    else:  # a passer-by or a sign entering from one side
        left = u < 0.5
        ww = W * (0.28 + 0.22 * w)
        x0, x1 = (-0.05 * W, ww) if left else (W - ww, W * 1.05)
        top = H * (0.15 + 0.45 * v)
        if tone < 0.6:
            coat = _c((50 + 120 * tone, 50 + 60 * w, 60 + 80 * v), 0.8)
            mid = (x0 + x1) / 2 + (-0.25 * ww if left else 0.25 * ww)
            sc.poly([(x0 - 0.2 * ww, H + 2), (x0 - 0.1 * ww, top + 0.12 * H), (x1 + 0.1 * ww, top + 0.12 * H),
                     (x1 + 0.2 * ww, H + 2)], coat, None)
            sc.ellipse(mid, top + 0.05 * H, 0.3 * ww, 0.075 * H, (40, 30, 25), None)
        else:
            col = [(30, 110, 60), (30, 60, 150), (220, 200, 40)][int(tone * 30) % 3]
            sc.poly([(x0, top), (x1, top), (x1, top + 0.22 * H), (x0, top + 0.22 * H)], col, None)
            sc.poly([((x0 + x1) / 2 - 0.03 * W, top + 0.22 * H), ((x0 + x1) / 2 + 0.03 * W, top + 0.22 * H),
                     ((x0 + x1) / 2 + 0.03 * W, H + 2), ((x0 + x1) / 2 - 0.03 * W, H + 2)], (110, 110, 115), None)


# ---------------------------------------------------------------------------------------------
# camera style

def apply_camera_style(img: Image.Image, style: dict | None, rng: np.random.Generator) -> Image.Image:
    """Low resolution, blur, gamma, saturation, colour cast, contrast, brightness, vignette, sensor noise.

    All steps but the noise run in PIL's C code (uint8): this is the hot loop of the generator.
    """
    if not style:
        return img
    w, h = img.size
    f = float(style.get("lowres", 1.0))
    if f > 1.0:
        img = img.resize((max(8, int(round(w / f))), max(8, int(round(h / f)))), Image.BILINEAR).resize((w, h), Image.BILINEAR)
    blur = float(style.get("blur", 0.0))
    if blur > 0.05:
        img = img.filter(ImageFilter.BoxBlur(blur))
    g = round(float(style.get("gamma", 1.0)), 4)
    if abs(g - 1.0) > 1e-3:
        img = img.point(_gamma_lut(g))
    # saturation, cast, contrast and brightness are one affine colour map
    sat = float(style.get("saturation", 1.0))
    lw = np.asarray([0.299, 0.587, 0.114])
    M = sat * np.eye(3) + (1.0 - sat) * np.outer(np.ones(3), lw)
    M = np.asarray(style.get("cast", (1.0, 1.0, 1.0)), np.float64)[:, None] * M
    c = float(style.get("contrast", 1.0))
    b = float(style.get("brightness", 1.0)) * float(rng.uniform(0.93, 1.07))
    A = M * c * b
    t = 255.0 * b * 0.5 * (1.0 - c)
    img = img.convert("RGB", tuple(float(v) for row in A for v in (*row, t)))
    vig = round(float(style.get("vignette", 0.0)), 3)
    if vig > 0:
        img = ImageChops.multiply(img, _vignette(w, h, vig))
    sigma = float(style.get("noise", 0.0))
    if sigma > 0:
        bank = _noise_bank(h, w)
        oy, ox = int(rng.integers(bank.shape[0] - h + 1)), int(rng.integers(bank.shape[1] - w + 1))
        win = bank[oy:oy + h, ox:ox + w]
        if rng.random() < 0.5:
            win = win[::-1]
        x = np.asarray(img, dtype=np.float32) + win * np.float32(sigma)
        np.clip(x, 0.0, 255.0, out=x)
        x += 0.5
        img = Image.fromarray(x.astype(np.uint8), "RGB")
    return img


_CACHE: dict[tuple, Any] = {}
_EDGE_LUT = [255, 158] + [0] * 254


def _white(w: int, h: int) -> Image.Image:
    key = ("white", w, h)
    if key not in _CACHE:
        _CACHE[key] = Image.new("L", (w, h), 255)
    return _CACHE[key]


def _gamma_lut(g: float) -> list[int]:
    key = ("gamma", g)
    if key not in _CACHE:
        lut = np.clip(np.round(255.0 * np.power(np.arange(256) / 255.0, g)), 0, 255).astype(int).tolist()
        _CACHE[key] = lut * 3
    return _CACHE[key]


def _vignette(w: int, h: int, vig: float) -> Image.Image:
    key = ("vignette", w, h, vig)
    if key not in _CACHE:
        yy = np.linspace(-1, 1, h)[:, None]
        xx = np.linspace(-1, 1, w)[None, :]
        m = np.clip(255.0 * (1.0 - vig * (xx * xx + yy * yy) / 2.0), 0, 255).astype(np.uint8)
        _CACHE[key] = Image.fromarray(m, "L").convert("RGB")
    return _CACHE[key]


def _noise_bank(h: int, w: int) -> np.ndarray:
    """A fixed bank of unit Gaussian noise; each image reads a random window (cheap and deterministic)."""
    key = ("noise", h, w)
    if key not in _CACHE:
        _CACHE[key] = np.random.default_rng(20260).standard_normal((h + 97, w + 61, 3), dtype=np.float32)
    return _CACHE[key]


# ---------------------------------------------------------------------------------------------
# the whole picture

def render_person(attrs: dict, pose: dict, style: dict | None, rng: np.random.Generator,
                  size: tuple[int, int] = IMAGE_SIZE) -> tuple[Image.Image, dict[str, GTBox]]:
    """Draw one pedestrian image and its ground truth.

    attrs: identity attributes (``head``/``upper``/``legs`` dicts with RGB colours, optional ``body``)
    pose:  per-image nuisance from :func:`sample_pose`
    style: one camera's style (see ``DOMAIN_STYLES`` in :mod:`muva_core.data.synthetic`); None = plain grey,
           no post-processing
    rng:   the image's generator (background clutter, noise)
    size:  (H, W) of the output

    Returns the RGB image and, for ``head``, ``upper``, ``legs`` and ``person``, a :class:`GTBox`
    in output pixels (clipped to the image) with the visible fraction of that part.
    """
    H, W = int(size[0]), int(size[1])
    ss = SUPERSAMPLE
    CH, CW = H * ss, W * ss
    style = style or {}
    u = float(pose["height"]) * float(attrs.get("body", {}).get("height", 1.0)) * CH
    fy = float(pose["foot"]) * CH
    if fy - u < 2 and pose.get("kind", "normal") == "normal":  # keep the head in the frame
        u = fy - 2
    fx = float(pose["cx"]) * CW

    sc = _Scene()
    info = _build_person(sc, attrs, pose, fx, fy, u)
    n_person_ops = len(sc.ops)

    img = _draw_background(style if style else {"background": "plain"}, rng, CW, CH)
    (f1, f2) = info["feet"]
    _ground_shadow(img, (f1[0] + f2[0]) / 2, fy - 0.004 * u, 0.15 * u, 0.022 * u)
    ids = Image.new("L", (CW, CH), 0)
    sc.render(img, ids)

    # per-part pixel counts before the occluder (for the visible fraction)
    person_ext = _union([sc.ext[p] for p in PARTS if p in sc.ext])
    lut = np.zeros(256, np.int64)
    lut[: len(sc.part_of)] = sc.part_of  # occluder shapes get part 0, so it stays valid after they are added
    counts_before = np.bincount(lut, weights=ids.histogram(), minlength=4)
    occ = pose.get("occluder")
    if occ:
        _add_occluder(sc, occ, person_ext, CW, CH)
        lut[: len(sc.part_of)] = sc.part_of
        sc.render(img, ids, start=n_person_ops)
        counts_after = np.bincount(lut, weights=ids.histogram(), minlength=4)
    else:
        counts_after = counts_before

    # one multiplier (x/255): cylinder-like shading of the person (body axis + side light), dark outlines
    dx = np.clip((np.arange(CW, dtype=np.float32) - info["hip_x"]) / (0.17 * u), -1.4, 1.4)
    light = float(style.get("light", 0.3))
    fac = np.round(255.0 * np.clip(1.0 - 0.22 * dx * dx + 0.12 * light * dx, 0.0, 1.0)).astype(np.uint8)
    shade = Image.fromarray(fac[None, :], "L").resize((CW, CH), Image.NEAREST)
    person = ids.point([255 if v else 0 for v in lut.tolist()])
    m = Image.composite(shade, _white(CW, CH), person)
    idm = np.asarray(ids)
    edge = np.zeros((CH, CW), np.uint8)
    dh = idm[:, 1:] != idm[:, :-1]
    dv = idm[1:, :] != idm[:-1, :]
    edge[:, 1:] |= dh
    edge[:, :-1] |= dh
    edge[1:, :] |= dv
    edge[:-1, :] |= dv
    m = ImageChops.multiply(m, Image.fromarray(edge, "L").point(_EDGE_LUT)).reduce(ss)
    img = ImageChops.multiply(img.reduce(ss), Image.merge("RGB", (m, m, m)))
    img = apply_camera_style(img, style, rng)

    # ground truth in output pixels
    gt: dict[str, GTBox] = {}
    for name in (*PARTS, "person"):
        if name == "person":
            full = person_ext
            before, after = counts_before[1:].sum(), counts_after[1:].sum()
        else:
            full = sc.ext[name]
            before, after = counts_before[PART_LABELS[name]], counts_after[PART_LABELS[name]]
        x0, y0, x1, y1 = (v / ss for v in full)
        cx0, cy0 = min(max(x0, 0.0), W), min(max(y0, 0.0), H)
        cx1, cy1 = min(max(x1, 0.0), W), min(max(y1, 0.0), H)
        area = max(1e-9, (x1 - x0) * (y1 - y0))
        in_frame = (cx1 - cx0) * (cy1 - cy0) / area
        vis = in_frame * (after / before) if before > 0 else 0.0
        gt[name] = GTBox(round(cx0, 2), round(cy0, 2), round(cx1, 2), round(cy1, 2), round(float(min(1.0, vis)), 4))
    return img, gt


def _union(boxes: list[list[float]]) -> list[float]:
    return [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]
