"""Drawing one synthetic scene: textured background, shapes, and optional spurious cues.

Pure functions of a ``numpy.random.Generator``: no files, no global RNG. The scene
(background, objects, sensor noise) and the cues draw from two separate generators, so
the same seed gives the same objects whether or not cues are drawn — a clean A/B pair
for catching shortcut learning.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, replace

import cv2
import numpy as np

# Class name -> base hue in degrees. Shapes AND colours differ; hue is jittered per object.
CLASS_HUES: dict[str, float] = {"circle": 0.0, "square": 220.0, "triangle": 120.0, "cross": 50.0}
CLASS_NAMES: tuple[str, ...] = tuple(CLASS_HUES)

# Class name -> (patch colour RGB, pattern colour RGB, pattern). Fixed, never jittered: a
# shortcut is only a shortcut if it is easy. Colours are kept off the class hues.
CUE_STYLES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int], str]] = {
    "circle": ((0, 255, 255), (0, 0, 0), "hbars"),
    "square": ((255, 0, 255), (0, 0, 0), "vbars"),
    "triangle": ((255, 255, 255), (0, 0, 0), "diagonal"),
    "cross": ((0, 0, 0), (255, 255, 255), "dot"),
}

OBJECT_SIZE_RANGE = (0.15, 0.45)  # largest bbox side, as a fraction of the image side
MAX_OBJECTS = 4
CUE_SIZE_RANGE = (0.09, 0.12)  # cue patch side, as a fraction of the image side
_MAX_PAIR_IOU = 0.1
_MAX_PAIR_COVER = 0.25  # intersection over the smaller box: no object hides under another
_PLACEMENT_TRIES = 50
_CUE_MARGIN_PX = 2
CUE_BESIDE_GAP_PX = 6  # "beside": the patch's nearest edge is at most this far from its object's box
CUE_RING_GAP_PX = 2  # "ring": pixels between the object's box and the inside of its ring
CUE_RING_WIDTH = 0.025  # "ring": ring thickness as a fraction of the image side (at least 2 px)
CUE_PLACEMENTS: tuple[str, ...] = ("anywhere", "beside", "ring")
_SUBPIXEL_BITS = 4  # cv2 fixed-point drawing: coordinates in 1/16 px


@dataclass(frozen=True)
class SceneObject:
    """One drawn object. ``box`` is ``(x1, y1, x2, y2)`` in pixels; ``polygon`` is ``float[K, 2]``."""

    class_index: int  # 0-based index into CLASS_NAMES
    box: tuple[float, float, float, float]
    polygon: np.ndarray
    area: float
    cue_box: tuple[int, int, int, int] | None = None  # (x, y, width, height) of its cue patch
    cue_wanted: bool = False  # the cue coin came up; cue_box is None only if there was no room
    look_index: int | None = None  # the class whose shape and hue it is drawn with; None: its own

    @property
    def looks_like(self) -> int:
        """0-based index of the class whose shape and hue the object has (its own unless
        appearance noise gave it another class's look)."""
        return self.class_index if self.look_index is None else self.look_index


def draw_scene(
    scene_rng: np.random.Generator,
    cue_rng: np.random.Generator,
    image_size: int,
    cue_probability: float,
    class_colours: bool = True,
    cue_placement: str = "anywhere",
    appearance_rng: np.random.Generator | None = None,
    appearance_noise: float = 0.0,
) -> tuple[np.ndarray, list[SceneObject]]:
    """Draws one scene. Returns ``uint8[S, S, 3]`` RGB and its objects (cue boxes filled in).

    ``class_colours=False`` gives every object a random hue (the same number of draws, so
    the scene is otherwise identical): then only the shape, or a cue, tells the class.
    ``cue_placement``: ``"anywhere"`` puts each cue patch at a random free spot;
    ``"beside"`` next to its own object's box (within ``CUE_BESIDE_GAP_PX`` of it);
    ``"ring"`` draws the cue as a ring in the class's cue colour around the object's box
    (``CUE_RING_GAP_PX`` off it, ``CUE_RING_WIDTH`` thick), like the ink circles drawn
    around lesions in dermatology photographs, a documented shortcut of skin-lesion
    classifiers. Ring pixels inside another object's box are not drawn.
    ``appearance_noise=p`` (with ``appearance_rng``, a third stream): each object, with
    probability ``p``, is drawn with the shape and hue of another class (uniformly chosen)
    while keeping its own label and cue — the object's look then tells its label less
    reliably than a cue does, as colour versus digit shape in Colored MNIST.
    """
    if appearance_noise > 0 and appearance_rng is None:
        raise ValueError("appearance_noise > 0 needs an appearance_rng")
    canvas = _background(scene_rng, image_size)
    objects = _place_objects(scene_rng, image_size, appearance_rng if appearance_noise > 0 else None, appearance_noise)
    for obj in objects:
        _draw_object(canvas, obj, scene_rng, class_colours)
    # Drawn from the scene stream before cues so it is identical with and without cues.
    sigma = scene_rng.uniform(3.0, 10.0)
    noise = scene_rng.standard_normal(canvas.shape, dtype=np.float32) * np.float32(sigma)
    if cue_placement not in CUE_PLACEMENTS:
        raise ValueError(f"unknown cue placement {cue_placement!r}")
    objects = _draw_cues(canvas, objects, cue_rng, image_size, cue_probability, cue_placement)
    image = np.clip(canvas + noise, 0, 255).astype(np.uint8)
    return image, objects


def _hsv(hue_deg: float, sat: float, val: float) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb((hue_deg % 360.0) / 360.0, sat, val)
    return np.array([r, g, b], dtype=np.float32) * 255.0


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    return _hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.6), rng.uniform(0.25, 0.85))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """``float32[S, S, 3]`` in ``[0, 255]``: smooth colour noise, stripes or a gradient, plus blobs."""
    c1, c2 = _muted_colour(rng), _muted_colour(rng)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = rng.integers(3)
    if kind == 0:  # smooth two-colour noise
        cells = int(rng.integers(3, 9))
        grid = rng.uniform(0.0, 1.0, (cells, cells)).astype(np.float32)
        weight = np.clip(cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC), 0, 1)
    elif kind == 1:  # stripes at a random angle, frequency and sharpness
        theta = rng.uniform(0, math.pi)
        periods = rng.uniform(2.0, 8.0)
        wave = np.sin(2 * math.pi * periods * (xx * math.cos(theta) + yy * math.sin(theta)) + rng.uniform(0, 6.3))
        weight = np.clip(0.5 + 0.5 * wave * rng.uniform(1.0, 4.0), 0, 1)
    else:  # linear gradient
        theta = rng.uniform(0, 2 * math.pi)
        ramp = xx * math.cos(theta) + yy * math.sin(theta)
        weight = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    canvas = c1 * (1 - weight[..., None]) + c2 * weight[..., None]
    for _ in range(int(rng.integers(0, 4))):  # soft distractor blobs: colour alone is not the class
        blob = np.zeros((size, size), np.float32)
        centre = (int(rng.integers(0, size)), int(rng.integers(0, size)))
        axes = (int(rng.uniform(0.05, 0.2) * size), int(rng.uniform(0.05, 0.2) * size))
        cv2.ellipse(blob, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        blob = cv2.GaussianBlur(blob, (0, 0), sigmaX=max(axes) * 0.5 + 1)
        alpha = (blob * rng.uniform(0.4, 0.9))[..., None]
        colour = _hsv(rng.uniform(0, 360), rng.uniform(0.2, 0.9), rng.uniform(0.3, 0.95))
        canvas = canvas * (1 - alpha) + colour * alpha
    return canvas.astype(np.float32)


def _unit_polygon(name: str, rng: np.random.Generator) -> np.ndarray | None:
    """Vertices ``float[K, 2]`` around the origin, randomly rotated; ``None`` for the circle."""
    if name == "circle":
        return None
    if name == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float32)
        angle = rng.uniform(0, 90)
    elif name == "triangle":
        pts = np.array([[math.cos(a), math.sin(a)] for a in np.deg2rad([-90, 30, 150])], np.float32)
        pts += rng.uniform(-0.08, 0.08, pts.shape).astype(np.float32)  # not every triangle equilateral
        angle = rng.uniform(0, 120)
    elif name == "cross":
        t = rng.uniform(0.28, 0.4)  # half arm thickness relative to the half span
        pts = np.array(
            [[-t, -1], [t, -1], [t, -t], [1, -t], [1, t], [t, t], [t, 1], [-t, 1], [-t, t], [-1, t], [-1, -t], [-t, -t]],
            np.float32,
        )
        angle = rng.uniform(0, 90)
    else:
        raise ValueError(f"unknown shape {name!r}")
    rad = math.radians(angle)
    rot = np.array([[math.cos(rad), -math.sin(rad)], [math.sin(rad), math.cos(rad)]], np.float32)
    return pts @ rot.T


def _iou_and_cover(a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, float]:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area_a + area_b - inter), inter / min(area_a, area_b)


def _place_objects(
    rng: np.random.Generator, size: int, look_rng: np.random.Generator | None = None, look_noise: float = 0.0
) -> list[SceneObject]:
    objects: list[SceneObject] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        class_index = int(rng.integers(len(CLASS_NAMES)))
        look = class_index
        if look_rng is not None:  # two draws per object whatever the outcome: streams stay aligned
            swap, other = look_rng.uniform() < look_noise, int(look_rng.integers(len(CLASS_NAMES) - 1))
            if swap:
                look = other if other < class_index else other + 1
        look_index = None if look == class_index else look
        for _try in range(_PLACEMENT_TRIES):
            extent = rng.uniform(*OBJECT_SIZE_RANGE) * size
            unit = _unit_polygon(CLASS_NAMES[look], rng)
            if unit is None:  # circle: a 48-gon for the segmentation, drawn exactly with cv2.circle
                angles = np.linspace(0, 2 * math.pi, 48, endpoint=False)
                unit = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
            span = unit.max(axis=0) - unit.min(axis=0)
            pts = unit * (extent / float(span.max()))
            lo, hi = pts.min(axis=0), pts.max(axis=0)
            offset = np.array([rng.uniform(-lo[0], size - hi[0]), rng.uniform(-lo[1], size - hi[1])], np.float32)
            pts = pts + offset
            box = (float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max()))
            if all(
                iou <= _MAX_PAIR_IOU and cover <= _MAX_PAIR_COVER
                for iou, cover in (_iou_and_cover(box, o.box) for o in objects)
            ):
                area = math.pi * (extent / 2) ** 2 if CLASS_NAMES[look] == "circle" else float(cv2.contourArea(pts))
                objects.append(SceneObject(class_index, box, pts, area, look_index=look_index))
                break
    return objects


def _draw_object(canvas: np.ndarray, obj: SceneObject, rng: np.random.Generator, class_colours: bool = True) -> None:
    name = CLASS_NAMES[obj.looks_like]
    jitter = rng.uniform(-12, 12)
    hue = CLASS_HUES[name] + jitter if class_colours else (jitter + 12) * 15.0  # one draw either way
    sat, val = rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)
    fill = tuple(float(c) for c in _hsv(hue, sat, val))
    outline = tuple(float(c) for c in _hsv(hue, sat, val * 0.45))
    with_outline = rng.uniform() < 0.5
    scale = 1 << _SUBPIXEL_BITS
    if name == "circle":
        x1, y1, x2, y2 = obj.box
        centre = (round((x1 + x2) / 2 * scale), round((y1 + y2) / 2 * scale))
        radius = round((x2 - x1) / 2 * scale)
        cv2.circle(canvas, centre, radius, fill, -1, cv2.LINE_AA, _SUBPIXEL_BITS)
        if with_outline:
            cv2.circle(canvas, centre, radius, outline, 2, cv2.LINE_AA, _SUBPIXEL_BITS)
        return
    pts = np.round(obj.polygon * scale).astype(np.int32)[None]
    cv2.fillPoly(canvas, pts, fill, cv2.LINE_AA, _SUBPIXEL_BITS)
    if with_outline:
        cv2.polylines(canvas, pts, True, outline, 2, cv2.LINE_AA, _SUBPIXEL_BITS)


def _draw_cues(
    canvas: np.ndarray,
    objects: list[SceneObject],
    rng: np.random.Generator,
    size: int,
    probability: float,
    placement: str = "anywhere",
) -> list[SceneObject]:
    """With ``probability`` per object, draws its class's cue patch where no object box lies
    (``"beside"``: within ``CUE_BESIDE_GAP_PX`` of the object's own box), or (``"ring"``) a
    ring around its box; see :func:`draw_scene`."""
    occupied = np.zeros((size, size), np.uint8)
    for obj in objects:
        x1, y1, x2, y2 = obj.box
        m = _CUE_MARGIN_PX
        occupied[max(0, math.floor(y1) - m) : math.ceil(y2) + m, max(0, math.floor(x1) - m) : math.ceil(x2) + m] = 1
    result = []
    for obj in objects:
        wants_cue = rng.uniform() < probability
        side = max(8, round(rng.uniform(*CUE_SIZE_RANGE) * size))
        cue_box = None
        if wants_cue and placement == "ring":
            result.append(replace(obj, cue_box=_draw_ring(canvas, obj, objects, size), cue_wanted=True))
            continue
        if wants_cue:
            while cue_box is None and side >= 6:
                cue_box = _free_square(occupied, side, rng, near=obj.box if placement == "beside" else None)
                side = round(side * 0.75)
        if cue_box is not None:
            x, y, w, h = cue_box
            _draw_cue_patch(canvas, CLASS_NAMES[obj.class_index], x, y, w)
            m = _CUE_MARGIN_PX
            occupied[max(0, y - m) : y + h + m, max(0, x - m) : x + w + m] = 1
        result.append(replace(obj, cue_box=cue_box, cue_wanted=wants_cue))
    return result


def ring_hole(box: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    """The inside edge of the ring drawn around ``box`` (xyxy pixels): the box, outward
    to whole pixels, widened by ``CUE_RING_GAP_PX`` (not clipped to the image)."""
    x1, y1, x2, y2 = box
    gap = CUE_RING_GAP_PX
    return math.floor(x1) - gap, math.floor(y1) - gap, math.ceil(x2) + gap, math.ceil(y2) + gap


def _draw_ring(
    canvas: np.ndarray, obj: SceneObject, objects: list[SceneObject], size: int
) -> tuple[int, int, int, int]:
    """Draws ``obj``'s class ring (its cue patch colour) around its box, skipping pixels
    inside any other object's box; returns the ring's outer box ``(x, y, width, height)``
    clipped to the image."""
    width = max(2, round(CUE_RING_WIDTH * size))
    inner = ring_hole(obj.box)
    ox1, oy1 = max(0, inner[0] - width), max(0, inner[1] - width)
    ox2, oy2 = min(size, inner[2] + width), min(size, inner[3] + width)
    mask = np.zeros((size, size), bool)
    mask[oy1:oy2, ox1:ox2] = True
    mask[max(0, inner[1]) : max(0, inner[3]), max(0, inner[0]) : max(0, inner[2])] = False
    for other in objects:
        if other is not obj:
            a1, b1, a2, b2 = other.box
            mask[max(0, math.floor(b1)) : math.ceil(b2), max(0, math.floor(a1)) : math.ceil(a2)] = False
    canvas[mask] = CUE_STYLES[CLASS_NAMES[obj.class_index]][0]
    return ox1, oy1, ox2 - ox1, oy2 - oy1


def _free_square(
    occupied: np.ndarray, side: int, rng: np.random.Generator, near: tuple[float, ...] | None = None
) -> tuple[int, int, int, int] | None:
    """A uniformly random ``side``-px square over free pixels, or ``None`` if there is none.

    ``near`` (an ``(x1, y1, x2, y2)`` box): only squares whose gap to that box is at most
    ``CUE_BESIDE_GAP_PX`` on both axes (they touch its margin ring).
    """
    size = occupied.shape[0]
    if side > size:
        return None
    integral = cv2.integral(occupied)  # (S+1, S+1) summed-area table: O(1) occupancy per window
    window = (
        integral[side:, side:] - integral[:-side, side:] - integral[side:, :-side] + integral[:-side, :-side]
    )
    free = window == 0
    if near is not None:
        # Top-left corners (x, y) of squares [x, x + side) whose gap to the box is small.
        x1, y1, x2, y2 = near
        gap = CUE_BESIDE_GAP_PX
        corners = np.arange(free.shape[0])
        ok_y = (corners + side >= y1 - gap) & (corners <= y2 + gap)
        ok_x = (corners + side >= x1 - gap) & (corners <= x2 + gap)
        free &= ok_y[:, None] & ok_x[None, :]
    ys, xs = np.nonzero(free)
    if len(xs) == 0:
        return None
    pick = int(rng.integers(len(xs)))
    return int(xs[pick]), int(ys[pick]), side, side


def _draw_cue_patch(canvas: np.ndarray, name: str, x: int, y: int, side: int) -> None:
    patch_colour, mark_colour, pattern = CUE_STYLES[name]
    # Drawn on a contiguous copy: OpenCV does not write through strided numpy views.
    patch = np.empty((side, side, 3), np.float32)
    patch[:] = patch_colour
    step = max(2, side // 4)
    if pattern == "hbars":
        for row in range(step // 2, side, step):
            patch[row : row + max(1, step // 2), :] = mark_colour
    elif pattern == "vbars":
        for col in range(step // 2, side, step):
            patch[:, col : col + max(1, step // 2)] = mark_colour
    elif pattern == "diagonal":
        cv2.line(patch, (0, 0), (side - 1, side - 1), mark_colour, max(1, side // 8))
        cv2.line(patch, (0, side - 1), (side - 1, 0), mark_colour, max(1, side // 8))
    elif pattern == "dot":
        cv2.circle(patch, (side // 2, side // 2), max(1, side // 4), mark_colour, -1)
    canvas[y : y + side, x : x + side] = patch
