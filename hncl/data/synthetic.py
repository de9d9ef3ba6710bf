"""Synthetic identity-confounded faces with exact 68-point landmarks: the embedded default data.

Each *identity* has a persistent look (face width and length, jaw, skin tone, hair style and
colour, eye colour, brows, glasses, beard, background, and small feature-geometry offsets) and
is seen with several of the 7 expressions at varying intensity; each *image* adds nuisance
(in-plane rotation, scale, translation, a little yaw, lighting). Identity is therefore easy to
learn from pixels, while expression is carried by the geometry of brows, eyes and mouth — the
situation HNCL is designed for. Expressions follow the usual action units (AU):

  happy     AU6+12    lip corners up and out, cheeks raise the lower lids
  sad       AU1+4+15  inner brows up, lip corners down
  surprise  AU1+2+5+26 brows up, eyes wide, jaw dropped
  fear      AU1+2+4+5+20 brows up and together, eyes wide, lips stretched, mouth a little open
  disgust   AU9+10    brows down, eyes narrowed, upper lip raised
  anger     AU4+5+23  brows down and together, lids tense, lips pressed

Landmarks use the iBUG 68-point order (same as dlib and FAN) in continuous pixel coordinates of
the output image with the origin at the top-left *corner* (pixel (i, j) covers x in [j, j+1)):
FAN's convention, so heatmaps at any resolution are a plain rescale.

**Difficulty.** On the "easy" faces (the original set) every expression is drawn at 0.5-1.0 of
full intensity, the same way by everyone, from the front, with exact landmarks: the nearest
aligned heatmap shares the expression ~99% of the time, which real faces do not (0.60-0.64 on real
posed/neutral photographs with dlib heatmaps, #24). `Difficulty` adds what makes real faces harder,
one named knob each (0 = off); "realistic" is calibrated to a nearest-heatmap purity of 0.55-0.70
on held-out identities (`benchmarks/synthetic_difficulty.py`). Every knob draws from its own random
stream, so "easy" renders the original faces bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterator, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

EXPRESSIONS = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger")
N_POINTS = 68
SUPERSAMPLE = 2  # draw at 2x and box-filter down: anti-aliased edges at little cost

# Action-unit-like controls, each in [-1, 1]; an expression is a prototype scaled by intensity.
_CONTROLS = ("brow_inner_up", "brow_outer_up", "brow_down_together", "eye_open", "lower_lid_up",
             "mouth_corner_up", "jaw_open", "mouth_stretch", "upper_lip_up", "lip_press")
_PROTOTYPES = {
    "neutral": {},
    "happy": {"mouth_corner_up": 1.0, "mouth_stretch": 0.6, "lower_lid_up": 0.7, "jaw_open": 0.25},
    "sad": {"brow_inner_up": 1.0, "brow_down_together": 0.3, "mouth_corner_up": -0.9, "eye_open": -0.3},
    "surprise": {"brow_inner_up": 1.0, "brow_outer_up": 1.0, "eye_open": 1.0, "jaw_open": 1.0,
                 "mouth_stretch": -0.4},
    "fear": {"brow_inner_up": 0.9, "brow_outer_up": 0.5, "brow_down_together": 0.6, "eye_open": 0.9,
             "mouth_stretch": 1.0, "jaw_open": 0.45, "mouth_corner_up": -0.3},
    "disgust": {"brow_down_together": 0.6, "eye_open": -0.5, "lower_lid_up": 0.5, "upper_lip_up": 1.0,
                "mouth_corner_up": -0.5, "jaw_open": 0.15},
    "anger": {"brow_down_together": 1.0, "brow_inner_up": -0.4, "eye_open": 0.35, "lower_lid_up": 0.6,
              "lip_press": 1.0, "mouth_stretch": -0.5},
}
HAIR_STYLES = ("short", "long", "bald", "curly", "fringe")
# controls that act on one side of the face (brows, eyes, lip corners): these get the asymmetry
_SIDED = ("brow_inner_up", "brow_outer_up", "brow_down_together", "eye_open", "lower_lid_up", "mouth_corner_up")


@dataclass(frozen=True)
class Difficulty:
    """What makes real faces harder than prototypes; each knob 0 (or the easy range) = off."""

    # expressions are drawn at intensity U(min_intensity, 1): real data holds subtle ones that are
    # barely distinguishable from neutral (easy: 0.5)
    min_intensity: float = 0.5
    # each person makes each expression their own way: every control of the prototype is scaled by
    # (1 + N(0, s)) and offset by N(0, s/2), drawn once per (person, expression)
    personal_style: float = 0.0
    # left/right difference of the one-sided controls, N(0, s) per (person, expression)
    asymmetry: float = 0.0
    # out-of-plane head pose in radians: yaw ~ U(-p, p), pitch ~ U(-p/2, p/2), projected with a
    # depth per landmark, so 2D landmark geometry changes (alignment cannot undo it)
    pose: float = 0.0
    # landmark localisation error like a detector's: N(0, s * inter-ocular distance) per point,
    # on the stored landmarks only (the face is drawn at the true points)
    landmark_noise: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.min_intensity <= 1.0:
            raise ValueError(f"min_intensity must be in [0, 1], got {self.min_intensity}")
        for name in ("personal_style", "asymmetry", "pose", "landmark_noise"):
            if not 0.0 <= getattr(self, name) <= (1.0 if name != "pose" else 0.8):
                raise ValueError(f"{name} must be in [0, {1.0 if name != 'pose' else 0.8}], got {getattr(self, name)}")


KNOBS = ("min_intensity", "personal_style", "asymmetry", "pose", "landmark_noise")
DIFFICULTIES = {
    "easy": Difficulty(),
    "realistic": Difficulty(min_intensity=0.15, personal_style=0.35, asymmetry=0.3, pose=0.35, landmark_noise=0.025),
}
# realistic with one knob back at its easy value, e.g. "realistic-no-pose": what each knob costs
# a method (benchmarks/demo_ablation.py --difficulty realistic-no-pose)
DIFFICULTIES.update({f"realistic-no-{k.replace('_', '-')}": replace(DIFFICULTIES["realistic"], **{k: getattr(Difficulty(), k)})
                     for k in KNOBS})


def as_difficulty(value) -> Difficulty:
    """A Difficulty from its name ("easy", "realistic") or itself."""
    if isinstance(value, Difficulty):
        return value
    if value not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {value!r}; choose one of {', '.join(DIFFICULTIES)}")
    return DIFFICULTIES[value]


@dataclass(frozen=True)
class Identity:
    """The persistent look of one synthetic person."""

    index: int
    face_w: float
    face_h: float
    jaw_round: float
    skin: Tuple[int, int, int]
    hair_style: str
    hair: Tuple[int, int, int]
    iris: Tuple[int, int, int]
    brow_thick: float
    glasses: bool
    beard: bool
    background: Tuple[int, int, int]
    eye_gap: float
    eye_size: float
    nose_len: float
    mouth_w: float
    lip_thick: float
    brow_height: float


@dataclass
class Face:
    image: np.ndarray  # uint8 [S, S, 3]
    landmarks: np.ndarray  # float32 [68, 2] (x, y), corner-origin pixel coordinates
    label: int  # index into EXPRESSIONS
    identity: int
    intensity: float


def make_identity(rng: np.random.Generator, index: int) -> Identity:
    tone = rng.uniform(0.25, 1.0)
    skin = tuple(int(c) for c in np.array([95, 60, 40]) + tone * np.array([150, 140, 120]))
    hair_palette = [(30, 25, 20), (70, 45, 25), (140, 95, 50), (200, 170, 110), (120, 120, 120), (160, 60, 30)]
    hair = hair_palette[rng.integers(len(hair_palette))]
    iris_palette = [(60, 40, 25), (40, 90, 150), (70, 120, 70), (110, 80, 40)]
    bg = tuple(int(c) for c in rng.integers(40, 230, 3))
    return Identity(
        index=index, face_w=rng.uniform(0.30, 0.38), face_h=rng.uniform(0.40, 0.47),
        jaw_round=rng.uniform(0.0, 1.0), skin=skin, hair_style=HAIR_STYLES[rng.integers(len(HAIR_STYLES))],
        hair=hair, iris=iris_palette[rng.integers(len(iris_palette))], brow_thick=rng.uniform(0.6, 1.4),
        glasses=bool(rng.random() < 0.25), beard=bool(rng.random() < 0.2), background=bg,  # type: ignore[arg-type]
        eye_gap=rng.uniform(-0.06, 0.06), eye_size=rng.uniform(0.9, 1.1), nose_len=rng.uniform(0.9, 1.1),
        mouth_w=rng.uniform(0.92, 1.08), lip_thick=rng.uniform(0.8, 1.2), brow_height=rng.uniform(-0.04, 0.04))


def expression_controls(label: int, intensity: float, style: Optional[np.ndarray] = None) -> dict:
    """The controls of an expression at an intensity; `style` [2, len(_CONTROLS)] (scale, offset)
    is one person's own way of making it."""
    proto = np.array([_PROTOTYPES[EXPRESSIONS[label]].get(c, 0.0) for c in _CONTROLS])
    if style is not None and label != 0:
        proto = proto * style[0] + style[1]
    return {c: float(intensity * v) for c, v in zip(_CONTROLS, proto)}


@dataclass(frozen=True)
class PersonStyle:
    """One person's idiosyncrasy: per expression, control scales and offsets and the left/right
    difference of the one-sided controls (all zero effect at Difficulty "easy")."""

    controls: np.ndarray  # [7, 2, len(_CONTROLS)]: scale, offset
    asymmetry: np.ndarray  # [7, len(_SIDED)]

    @classmethod
    def draw(cls, rng: np.random.Generator, d: Difficulty) -> "PersonStyle":
        n, k = len(EXPRESSIONS), len(_CONTROLS)
        scale = 1 + d.personal_style * rng.standard_normal((n, k))
        offset = 0.5 * d.personal_style * rng.standard_normal((n, k))
        return cls(np.stack([scale, offset], 1), d.asymmetry * rng.standard_normal((n, len(_SIDED))))


def sided_landmarks(ident: "Identity", ctrl: dict, asymmetry: np.ndarray, intensity: float) -> np.ndarray:
    """face_landmarks with the one-sided controls moved by +delta on the image-left half and -delta
    on the right (delta = intensity x asymmetry); points on the midline average the two."""
    if not np.any(asymmetry):
        return face_landmarks(ident, ctrl)
    delta = dict(zip(_SIDED, intensity * asymmetry))
    left = face_landmarks(ident, {c: v + delta.get(c, 0.0) for c, v in ctrl.items()})
    right = face_landmarks(ident, {c: v - delta.get(c, 0.0) for c, v in ctrl.items()})
    side = np.sign(np.round(left[:, :1], 6))
    return np.where(side < 0, left, np.where(side > 0, right, (left + right) / 2))


def project_pose(pts: np.ndarray, ident: "Identity", yaw: float, pitch: float) -> np.ndarray:
    """Turn the face out of the image plane and project it back (orthographic): each point gets a
    depth (an ellipsoidal face, the nose standing out), so turning the head foreshortens one side
    and moves the nose across the face, as it does in a photograph."""
    if yaw == 0.0 and pitch == 0.0:
        return pts
    w, h = ident.face_w, ident.face_h
    x, y = pts[:, 0], pts[:, 1]
    z = 0.6 * w * np.sqrt(np.clip(1 - (x / (1.05 * w)) ** 2 - 0.25 * (y / h) ** 2, 0.0, 1.0))
    z[27:31] += np.linspace(0.01, 0.06, 4)  # the nose bridge down to the tip
    z[31:36] += np.array([0.02, 0.03, 0.04, 0.03, 0.02])
    x2 = x * math.cos(yaw) + z * math.sin(yaw)
    z2 = -x * math.sin(yaw) + z * math.cos(yaw)
    y2 = y * math.cos(pitch) - z2 * math.sin(pitch)
    return np.stack([x2, y2], 1)


def _curve(p0, p1, n, bulge):
    """n points from p0 to p1 along a parabola bulging by `bulge` (normal offset, +y down)."""
    t = np.linspace(0, 1, n)
    pts = np.outer(1 - t, p0) + np.outer(t, p1)
    pts[:, 1] += bulge * 4 * t * (1 - t)
    return pts


def face_landmarks(ident: Identity, ctrl: dict) -> np.ndarray:
    """68 iBUG points in a face-centred frame (units of image size, y down, origin = face centre)."""
    c = ctrl
    w, h = ident.face_w, ident.face_h
    pts = np.zeros((N_POINTS, 2))
    # jaw 0..16: from the right ear (image left) round the chin; jaw drop lowers the chin
    ang = np.linspace(math.pi * 0.98, math.pi * 0.02, 17)
    chin_drop = 0.06 * max(c["jaw_open"], 0)
    rx, ry = w, h * 0.78
    jaw_x = rx * np.cos(ang) * (1 - 0.12 * (1 - ident.jaw_round) * np.sin(ang) ** 4)
    jaw_y = -0.02 + ry * np.sin(ang) ** (0.8 + 0.4 * ident.jaw_round) + chin_drop * np.sin(ang) ** 3
    pts[0:17] = np.stack([jaw_x, jaw_y], 1)
    # eyes 36..47
    eye_y = -0.06
    eye_cx = 0.135 + ident.eye_gap * 0.5
    ew = 0.062 * ident.eye_size
    open_ = 0.022 * ident.eye_size * (1 + 0.8 * c["eye_open"])
    low = 0.016 * ident.eye_size * (1 - 0.7 * max(c["lower_lid_up"], 0))
    for side, base in ((-1, 36), (1, 42)):
        cx = side * eye_cx
        outer, inner = cx + side * ew, cx - side * ew
        left, right = (outer, inner) if side < 0 else (inner, outer)
        xs = np.array([left, left + (right - left) / 3, left + 2 * (right - left) / 3, right])
        upper = np.array([eye_y, eye_y - open_, eye_y - open_, eye_y])
        lower = np.array([eye_y + low, eye_y + low])
        pts[base + 0] = (xs[0], upper[0])
        pts[base + 1] = (xs[1], upper[1])
        pts[base + 2] = (xs[2], upper[2])
        pts[base + 3] = (xs[3], upper[3])
        pts[base + 4] = (xs[2], lower[0])
        pts[base + 5] = (xs[1], lower[1])
    # brows 17..26: raise (inner/outer) and lower+together (AU4)
    brow_base = eye_y - 0.065 + ident.brow_height
    together = 0.03 * max(c["brow_down_together"], 0)
    down = 0.035 * max(c["brow_down_together"], 0)
    for side, base in ((-1, 17), (1, 22)):
        inner_x = side * (0.045 - together * 0.8 + ident.eye_gap * 0.3)
        outer_x = side * (eye_cx + ew + 0.02)
        xs = np.linspace(outer_x, inner_x, 5)
        t = np.linspace(0, 1, 5)  # 0 = outer end, 1 = inner end
        lift = 0.045 * (c["brow_inner_up"] * t + c["brow_outer_up"] * (1 - t))
        arch = -0.018 * np.sin(t * math.pi) * (1 - 0.5 * max(c["brow_down_together"], 0))
        ys = brow_base - lift + arch + down * (0.5 + 0.5 * t)
        order = slice(None) if side < 0 else slice(None, None, -1)
        pts[base:base + 5] = np.stack([xs, ys], 1)[order]
    # nose 27..35
    nl = 0.15 * ident.nose_len
    nose_top = eye_y - 0.005
    pts[27:31] = np.stack([np.zeros(4), np.linspace(nose_top, nose_top + nl, 4)], 1)
    sneer = 0.008 * max(c["upper_lip_up"], 0)
    base_y = nose_top + nl + 0.022 - sneer
    pts[31:36] = np.stack([np.linspace(-0.045, 0.045, 5), base_y + np.array([-0.008, 0.004, 0.008, 0.004, -0.008])], 1)
    # mouth 48..67
    mw = 0.105 * ident.mouth_w * (1 + 0.25 * c["mouth_stretch"] - 0.15 * max(c["lip_press"], 0))
    my = base_y + 0.09 + 0.5 * chin_drop
    corner_y = my - 0.04 * c["mouth_corner_up"]
    lip = 0.022 * ident.lip_thick * (1 - 0.6 * max(c["lip_press"], 0))
    gap = 0.075 * max(c["jaw_open"], 0)
    raise_ = 0.025 * max(c["upper_lip_up"], 0)
    # inner lip line top (60..64) and bottom (64..67,60)
    inner_top = my - 0.5 * gap * 0.3 - raise_ * 0.6
    inner_bot = my + gap
    pts[48] = (-mw, corner_y)
    pts[54] = (mw, corner_y)
    top_x = np.array([-0.66, -0.33, 0.0, 0.33, 0.66]) * mw
    smile_shape = -0.018 * c["mouth_corner_up"] * np.abs(top_x / mw) ** 2
    pts[49:54] = np.stack([top_x, inner_top - lip - raise_ * 0.4 + smile_shape + np.array([0.002, -0.002, 0.004, -0.002, 0.002])], 1)
    bot_x = np.array([0.66, 0.33, 0.0, -0.33, -0.66]) * mw
    bot_curve = inner_bot + lip * 1.2 - 0.022 * c["mouth_corner_up"] * np.abs(bot_x / mw) ** 2 * 0.5
    pts[55:60] = np.stack([bot_x, bot_curve], 1)
    ic = 0.85
    pts[60] = (-mw * ic, corner_y)
    pts[64] = (mw * ic, corner_y)
    it_x = np.array([-0.4, 0.0, 0.4]) * mw
    pts[61:64] = np.stack([it_x, inner_top + smile_shape[[1, 2, 3]] * 0.8], 1)
    ib_x = np.array([0.4, 0.0, -0.4]) * mw
    pts[65:68] = np.stack([ib_x, inner_bot - 0.01 * c["mouth_corner_up"] * np.abs(ib_x / mw)], 1)
    return pts


def _ellipse(cx, cy, rx, ry, n=24, start=0.0, end=2 * math.pi):
    t = np.linspace(start, end, n)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


class FaceRenderer:
    """Deterministic renderer: the same (seed, identity, label, intensity, nuisance) draws the
    same face."""

    def __init__(self, size: int = 112):
        if size < 32:
            raise ValueError(f"face size must be >= 32 px, got {size}")
        self.size = size
        yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
        self._grid = (xx.astype(np.float32), yy.astype(np.float32))

    def render(self, ident: Identity, label: int, intensity: float, rng: np.random.Generator,
               style: Optional[PersonStyle] = None, pose: Tuple[float, float] = (0.0, 0.0),
               landmark_noise: Optional[np.ndarray] = None) -> Face:
        """`rng` draws the in-plane nuisance and lighting; `style` (the person's), `pose` (yaw,
        pitch) and `landmark_noise` ([68, 2] in inter-ocular distances) are the Difficulty's."""
        s = self.size
        ctrl = expression_controls(label, intensity, None if style is None else style.controls[label])
        if style is None:
            local = face_landmarks(ident, ctrl)
        else:
            local = sided_landmarks(ident, ctrl, style.asymmetry[label], intensity)
        local = project_pose(local, ident, *pose)
        # per-image nuisance: similarity transform + a little yaw
        angle = rng.uniform(-0.14, 0.14)
        scale = s * rng.uniform(0.92, 1.08)
        shift = np.array([0.5, 0.52]) * s + rng.uniform(-0.045, 0.045, 2) * s
        yaw = rng.uniform(-0.05, 0.05)
        rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])

        def tf(p, depth=1.0):
            p = np.asarray(p, dtype=np.float64).copy()
            p[..., 0] += yaw * depth  # features nearer the camera shift more with yaw
            return (p @ rot.T) * scale + shift

        k = SUPERSAMPLE
        img = Image.new("RGB", (s * k, s * k), ident.background)
        draw = ImageDraw.Draw(img)

        def poly(p, fill, depth=1.0, outline=None, width=1):
            q = tf(p, depth) * k - 0.5
            draw.polygon([tuple(v) for v in q], fill=fill, outline=outline, width=width)

        def line(p, fill, width, depth=1.0):
            q = tf(p, depth) * k - 0.5
            draw.line([tuple(v) for v in q], fill=fill, width=max(1, int(round(width * s * k))), joint="curve")

        w, h = ident.face_w, ident.face_h
        dark = tuple(int(v * 0.55) for v in ident.skin)
        # hair behind the head, neck, face
        if ident.hair_style == "long":
            poly(np.concatenate([_ellipse(0, -0.05, w * 1.25, h * 1.05, 30, math.pi, 2 * math.pi),
                                 [[w * 1.3, h * 0.9], [-w * 1.3, h * 0.9]]]), ident.hair, 0.3)
        poly([[-w * 0.45, h * 0.5], [w * 0.45, h * 0.5], [w * 0.55, 0.8], [-w * 0.55, 0.8]], dark, 0.3)
        jaw = local[0:17]
        forehead = _ellipse(0, -0.02, w, h * 0.98, 20, math.pi * 1.98, math.pi * 1.02)  # right to left
        face_outline = np.concatenate([jaw, forehead])
        poly(face_outline, ident.skin, 0.6)
        # ears
        for side in (-1, 1):
            poly(_ellipse(side * w * 1.02, -0.03, 0.03, 0.06, 12), ident.skin, 0.3)
        # hair on top
        if ident.hair_style in ("short", "long", "fringe", "curly"):
            cap = _ellipse(0, -0.05, w * 1.06, h * 0.98, 24, math.pi, 2 * math.pi)
            if ident.hair_style == "fringe":
                cap = np.concatenate([cap, [[w * 0.9, -0.16], [0, -0.13], [-w * 0.9, -0.16]]])
            else:
                cap = np.concatenate([cap, [[w * 0.95, -0.2], [0, -0.3], [-w * 0.95, -0.2]]])
            poly(cap, ident.hair, 0.6)
            if ident.hair_style == "curly":
                for cx in np.linspace(-w, w, 7):
                    poly(_ellipse(cx, -h * 0.78 + abs(cx) * 0.6, 0.04, 0.035, 10), ident.hair, 0.6)
        if ident.beard:
            beard = np.concatenate([jaw[3:14], _curve(jaw[13] + [0, -0.02], jaw[3] + [0, -0.02], 9, 0.06)[1:-1]])
            poly(beard, tuple(int(v * 0.9) for v in ident.hair), 0.9)
        # eyes
        for base in (36, 42):
            eye = local[base:base + 6]
            poly(eye, (245, 245, 240), 1.0)
            cx, cy = eye[[0, 3], 0].mean(), eye[:, 1].mean()
            r = min(0.018 * ident.eye_size, 0.5 * (eye[4:6, 1].mean() - eye[1:3, 1].mean()) + 0.004)
            poly(_ellipse(cx, cy, r, r, 14), ident.iris, 1.0)
            poly(_ellipse(cx, cy, r * 0.45, r * 0.45, 10), (15, 15, 15), 1.0)
            line(np.concatenate([eye[0:4]]), (40, 30, 30), 0.008, 1.0)
        # brows
        brow_col = tuple(int(v * 0.7) for v in ident.hair) if ident.hair_style != "bald" else (60, 45, 35)
        for base in (17, 22):
            line(local[base:base + 5], brow_col, 0.017 * ident.brow_thick, 1.0)
        # nose
        line(local[27:31], dark, 0.008, 1.2)
        line(local[31:36], dark, 0.009, 1.2)
        # mouth: lips then the opening
        lip_col = (min(255, int(ident.skin[0] * 0.85 + 60)), int(ident.skin[1] * 0.55), int(ident.skin[2] * 0.55))
        poly(local[48:60], lip_col, 1.0)
        inner = np.concatenate([local[60:65], local[65:68]])
        if (local[66, 1] - local[62, 1]) > 0.006:
            poly(inner, (70, 20, 25), 1.0)
            teeth = np.concatenate([local[60:65], local[[64]] + [0, 0.012], local[[60]] + [0, 0.012]])
            poly(teeth, (235, 235, 225), 1.0)
        else:
            line(inner[:5], (90, 35, 40), 0.006, 1.0)
        if ident.glasses:
            for base in (36, 42):
                eye = local[base:base + 6]
                cx, cy = eye[:, 0].mean(), eye[:, 1].mean()
                line(_ellipse(cx, cy, 0.085, 0.055, 24), (20, 20, 20), 0.008, 1.0)
            line([[-0.055, -0.065], [0.055, -0.065]], (20, 20, 20), 0.008, 1.0)

        img = img.resize((s, s), Image.Resampling.BOX)
        arr = np.asarray(img, dtype=np.float32)
        # lighting: global gain and a linear gradient across the face
        gain = rng.uniform(0.75, 1.2)
        direction = rng.uniform(0, 2 * math.pi)
        xx, yy = self._grid
        grad = 1 + rng.uniform(0.0, 0.35) * (xx * math.cos(direction) + yy * math.sin(direction))
        arr = np.clip(arr * (gain * grad)[..., None], 0, 255).astype(np.uint8)
        points = tf(local)
        if landmark_noise is not None:
            points = points + landmark_noise * np.linalg.norm(points[36:42].mean(0) - points[42:48].mean(0))
        return Face(image=arr, landmarks=points.astype(np.float32), label=label, identity=ident.index,
                    intensity=intensity)


class SyntheticFaces:
    """A deterministic set of faces: `num_identities` people, `per_identity` images each with
    expressions drawn uniformly. Splits use disjoint identities (train: identities 0..N-1 of the
    seed's stream; test: an independent stream), so a test split never shares a person with train.
    """

    def __init__(self, num_identities: int, per_identity: int, size: int = 112, seed: int = 0,
                 split: str = "train", difficulty: "str | Difficulty" = "easy"):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.num_identities, self.per_identity, self.seed, self.split = num_identities, per_identity, seed, split
        self.difficulty = as_difficulty(difficulty)
        self.renderer = FaceRenderer(size)
        # identity indices are globally unique per split: train 0.., test 1_000_000..
        self.id_offset = 0 if split == "train" else 1_000_000
        self._identities: List[Identity] = []
        self._styles: List[PersonStyle] = []
        for i in range(num_identities):
            rng = np.random.default_rng([seed, 1 if split == "test" else 0, i])
            self._identities.append(make_identity(rng, self.id_offset + i))
            # the Difficulty's own streams (4: person, 5: image), so "easy" draws the original faces
            self._styles.append(PersonStyle.draw(np.random.default_rng([seed, 1 if split == "test" else 0, i, 4]),
                                                 self.difficulty))

    def __len__(self) -> int:
        return self.num_identities * self.per_identity

    def sample_id(self, index: int) -> int:
        return self.id_offset * 1000 + index if self.split == "test" else index

    def __getitem__(self, index: int) -> Face:
        if not 0 <= index < len(self):
            raise IndexError(index)
        d = self.difficulty
        ident = self._identities[index // self.per_identity]
        rng = np.random.default_rng([self.seed, 2 if self.split == "test" else 3, index])
        label = int(rng.integers(len(EXPRESSIONS)))
        intensity = 0.0 if label == 0 else float(rng.uniform(d.min_intensity, 1.0))
        if d == DIFFICULTIES["easy"]:
            return self.renderer.render(ident, label, intensity, rng)
        image_rng = np.random.default_rng([self.seed, 2 if self.split == "test" else 3, index, 5])
        pose = (float(image_rng.uniform(-d.pose, d.pose)), float(image_rng.uniform(-d.pose / 2, d.pose / 2)))
        noise = d.landmark_noise * image_rng.standard_normal((N_POINTS, 2))
        return self.renderer.render(ident, label, intensity, rng, self._styles[index // self.per_identity], pose, noise)

    def __iter__(self) -> Iterator[Face]:
        for i in range(len(self)):
            yield self[i]


def contact_sheet(faces: List[Face], path: str, columns: int = 8, draw_landmarks: bool = True) -> None:
    """A PNG grid of faces with their landmarks (coloured by region) and expression names."""
    if not faces:
        raise ValueError("no faces to draw")
    s = faces[0].image.shape[0]
    scale = max(1, 160 // s)
    cell = s * scale
    rows = math.ceil(len(faces) / columns)
    sheet = Image.new("RGB", (columns * cell, rows * (cell + 14)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    colours = [((0, 17), (255, 255, 0)), ((17, 27), (255, 0, 0)), ((27, 36), (0, 255, 0)),
               ((36, 48), (0, 200, 255)), ((48, 68), (255, 0, 255))]
    for n, face in enumerate(faces):
        x0, y0 = (n % columns) * cell, (n // columns) * (cell + 14)
        sheet.paste(Image.fromarray(face.image).resize((cell, cell), Image.Resampling.NEAREST), (x0, y0))
        if draw_landmarks:
            for (a, b), col in colours:
                for x, y in face.landmarks[a:b] * scale:
                    draw.ellipse([x0 + x - 1.5, y0 + y - 1.5, x0 + x + 1.5, y0 + y + 1.5], fill=col)
        draw.text((x0 + 2, y0 + cell + 1), f"{EXPRESSIONS[face.label]} id{face.identity}", fill=(0, 0, 0))
    sheet.save(path)
