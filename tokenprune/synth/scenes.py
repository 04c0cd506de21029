"""SynthVQA scenes: a seeded procedural renderer with a per-pixel object map.

A scene is a dark background with up to four objects, one per quadrant. The background has a
*layout* (:data:`LAYOUTS`): one flat colour, a brightness gradient of it across the image, or two
regions (the scene's colour over most of the image, a second colour on a band, a corner or a
blob covering 15-30% of it), and on top of that a texture (plain, stripes, noise, checker). The
answer to "what colour is the background ?" is the colour that covers most of the visible
background, so on a two-region scene one background token is not enough to answer it. Objects are
coloured shapes (circle, square, triangle, cross) and at most one small white plate with a black
5x7-pixel digit on it (the "text"). Objects never straddle the image's midlines, so the quadrant
of an object (its position answer) is unambiguous.

Objects:
coloured shapes (circle, square, triangle, cross) and at most one small white plate with a black
5x7-pixel digit on it (the "text"). Objects never straddle the image's midlines, so the quadrant
of an object (its position answer) is unambiguous.

Every shape kind also has its own one-pixel fill pattern (:data:`SHAPE_PATTERNS`: circles solid,
squares in horizontal stripes, triangles in vertical stripes, crosses in a checkerboard), drawn in
the shape's colour and a tint of it that is lighter for each kind (:data:`SHAPE_TINTS`). A 4x4
vision patch inside a plain shape is a flat colour whatever the outline, so its kind is only
visible from the neighbouring patches; the mini VLM's 3-layer vision tower did not learn that from
scratch in the CPU budget (docs/synth.md), while the pattern and the tint make the kind visible in
every patch of the shape, as its colour is. The downscaled base view blurs the patterns but keeps
the average tint.

Image sizes are exactly LLaVA-NeXT anyres pinpoints (see :data:`IMAGE_SIZES`), so the high-res
tiles cut the rendered pixels without resampling and every vision patch maps to a known 4x4 pixel
block; this is what the patch-level auxiliary labels of the training recipe rely on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: (height, width) of the rendered images; each one is an anyres pinpoint of the mini VLM.
IMAGE_SIZES: tuple[tuple[int, int], ...] = ((64, 64), (32, 64), (64, 32), (32, 96), (96, 32))

# fmt: off
#: The background colours by name, (R, G, B).
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (10, 10, 10),  "gray": (90, 90, 90),   "brown": (100, 60, 25),
    "navy": (20, 30, 110),  "olive": (95, 95, 20),  "teal": (15, 100, 100),
}
#: The shape colours by name, (R, G, B).
SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),      "green": (40, 210, 60),     "blue": (70, 120, 255),
    "yellow": (245, 230, 40),  "purple": (180, 60, 230),   "orange": (255, 150, 20),
}
# fmt: on
SHAPE_KINDS: tuple[str, ...] = ("circle", "square", "triangle", "cross")
#: The fill pattern of each shape kind: pixels where the pattern is on are drawn in the tint.
SHAPE_PATTERNS: dict[str, str] = {
    "circle": "solid",
    "square": "hstripes",
    "triangle": "vstripes",
    "cross": "checker",
}
#: Share of white mixed into a shape's colour on its pattern pixels, per kind. With the patterns'
#: 50% duty cycle the kinds also differ in average whiteness (0, 0.2, 0.35, 0.5), which survives the
#: downscaled base view where the one-pixel patterns do not.
SHAPE_TINTS: dict[str, float] = {
    "circle": 0.0,
    "square": 0.4,
    "triangle": 0.7,
    "cross": 1.0,
}
TEXTURES: tuple[str, ...] = ("plain", "stripes", "noise", "checker")
#: How the background colour is laid out: flat, a brightness gradient, or two colour regions.
LAYOUTS: tuple[str, ...] = ("uniform", "gradient", "regions")
#: Shapes of the second colour's region in a ``regions`` layout.
REGION_SHAPES: tuple[str, ...] = ("band", "corner", "blob")
#: Share of the image the second colour covers in a ``regions`` layout.
MIN_REGION, MAX_REGION = 0.15, 0.30
#: Brightness factor across a ``gradient`` layout, from one side of the image to the other.
GRADIENT_RANGE = (0.55, 1.45)
QUADRANTS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")
TEXT_KIND = "text"
PLATE_COLOUR = (245, 245, 245)
INK_COLOUR = (0, 0, 0)
MIN_SHAPE, MAX_SHAPE = 9, 18
PLATE_H, PLATE_W = 9, 7

_FONT_ROWS: dict[str, tuple[str, ...]] = {
    "0": ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    "1": ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    "2": ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    "3": ("11111", "00010", "00100", "00010", "00001", "10001", "01110"),
    "4": ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    "5": ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    "6": ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    "7": ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    "8": ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    "9": ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
}
DIGITS: tuple[str, ...] = tuple(_FONT_ROWS)


def glyph(digit: str) -> np.ndarray:
    """The 5x7 bitmap of ``digit`` as a boolean array of shape (7, 5)."""
    if digit not in _FONT_ROWS:
        raise ValueError(f"no glyph for {digit!r}; the font has the digits {''.join(DIGITS)}")
    return np.array([[c == "1" for c in row] for row in _FONT_ROWS[digit]], dtype=bool)


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene.

    Attributes:
        kind: a shape kind from :data:`SHAPE_KINDS`, or ``"text"`` for the digit plate.
        colour: a name from :data:`SHAPE_COLOURS`; ``"white"`` for the text plate.
        quadrant: a name from :data:`QUADRANTS`.
        box: (top, left, height, width) in pixels.
        digit: the digit on the plate (text objects only).
    """

    kind: str
    colour: str
    quadrant: str
    box: tuple[int, int, int, int]
    digit: str | None = None


@dataclass(frozen=True)
class Scene:
    """A full scene description; :func:`render` turns it into pixels.

    Attributes:
        height, width: the image size in pixels.
        background: the colour that covers most of the visible background (the answer).
        texture: a name from :data:`TEXTURES`.
        texture_seed: the seed of the texture's and the layout's random details.
        objects: the objects, in quadrant order.
        layout: a name from :data:`LAYOUTS`.
        second: the other colour of a ``regions`` layout (None otherwise).
    """

    height: int
    width: int
    background: str
    texture: str
    texture_seed: int
    objects: tuple[SceneObject, ...] = field(default_factory=tuple)
    layout: str = "uniform"
    second: str | None = None

    @property
    def shapes(self) -> tuple[SceneObject, ...]:
        """The objects that are shapes (the text plate excluded)."""
        return tuple(o for o in self.objects if o.kind != TEXT_KIND)

    @property
    def text(self) -> SceneObject | None:
        """The text plate, or None."""
        return next((o for o in self.objects if o.kind == TEXT_KIND), None)

    def at(self, quadrant: str) -> SceneObject | None:
        """The object in ``quadrant``, or None."""
        return next((o for o in self.objects if o.quadrant == quadrant), None)


def quadrant_origin(height: int, width: int, quadrant: str) -> tuple[int, int, int, int]:
    """(top, left, height, width) of ``quadrant`` in an image of the given size."""
    qh, qw = height // 2, width // 2
    row, col = divmod(QUADRANTS.index(quadrant), 2)
    return row * qh, col * qw, qh, qw


def place_object(
    rng: np.random.Generator,
    height: int,
    width: int,
    quadrant: str,
    kind: str,
    colour: str,
    digit: str | None = None,
) -> SceneObject:
    """A randomly sized and jittered object that lies fully inside ``quadrant``."""
    top, left, qh, qw = quadrant_origin(height, width, quadrant)
    if kind == TEXT_KIND:
        h, w = PLATE_H, PLATE_W
    else:
        s = int(rng.integers(MIN_SHAPE, min(MAX_SHAPE, qh - 2, qw - 2) + 1))
        h = w = s
    y = top + 1 + int(rng.integers(0, qh - h - 1))
    x = left + 1 + int(rng.integers(0, qw - w - 1))
    return SceneObject(kind=kind, colour=colour, quadrant=quadrant, box=(y, x, h, w), digit=digit)


def _shape_mask(kind: str, h: int, w: int) -> np.ndarray:
    """Boolean (h, w) mask of a shape filling an h x w box."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    if kind == "circle":
        cy, cx, r = h / 2, w / 2, min(h, w) / 2
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if kind == "square":
        m = np.zeros((h, w), dtype=bool)
        m[1 : h - 1, 1 : w - 1] = True
        return m
    if kind == "triangle":
        # apex at the top centre, base along the bottom row
        half = (yy / h) * (w / 2)
        return np.abs(xx - w / 2) <= half
    if kind == "cross":
        t = max(2, round(min(h, w) / 3))
        m = np.zeros((h, w), dtype=bool)
        y0, x0 = (h - t) // 2, (w - t) // 2
        m[y0 : y0 + t, :] = True
        m[:, x0 : x0 + t] = True
        return m
    raise ValueError(f"unknown shape kind {kind!r}; use one of {SHAPE_KINDS}")


def _pattern_mask(pattern: str, top: int, left: int, h: int, w: int) -> np.ndarray:
    """Boolean (h, w) mask of the tinted pixels of ``pattern`` for a box at (top, left).

    The pattern is anchored to the image grid (not the box), so a patch shows the same phase
    wherever the shape lies.
    """
    yy, xx = np.mgrid[top : top + h, left : left + w]
    if pattern == "solid":
        return np.zeros((h, w), dtype=bool)
    if pattern == "hstripes":
        return yy % 2 == 1
    if pattern == "vstripes":
        return xx % 2 == 1
    if pattern == "checker":
        return (yy + xx) % 2 == 1
    raise ValueError(f"unknown fill pattern {pattern!r}; use one of {sorted(set(SHAPE_PATTERNS.values()))}")


def second_region(scene: Scene) -> np.ndarray:
    """(H, W) bool: where a ``regions`` layout draws its second colour (all False for other layouts).

    The region is a band along one edge, a triangle in one corner or an elliptical blob, covering
    a share of the image drawn from ``[MIN_REGION, MAX_REGION]``; all of it follows from
    ``scene.texture_seed``.
    """
    h, w = scene.height, scene.width
    if scene.layout != "regions":
        return np.zeros((h, w), dtype=bool)
    rng = np.random.default_rng([scene.texture_seed, 0x4E6])
    share = float(rng.uniform(MIN_REGION, MAX_REGION))
    yy, xx = (np.mgrid[0:h, 0:w].astype(np.float32) + 0.5) / np.array([h, w], dtype=np.float32)[:, None, None]
    shape = REGION_SHAPES[int(rng.integers(len(REGION_SHAPES)))]
    if shape == "band":
        coord = [yy, 1 - yy, xx, 1 - xx][int(rng.integers(4))]
        return coord < share
    if shape == "corner":  # the triangle u + v < t has area t^2 / 2
        u = xx if rng.random() < 0.5 else 1 - xx
        v = yy if rng.random() < 0.5 else 1 - yy
        return u + v < np.sqrt(2 * share)
    cy, cx = rng.uniform(0.25, 0.75, size=2)
    aspect = float(rng.uniform(0.6, 1.6))
    ry, rx = np.sqrt(share / np.pi * aspect), np.sqrt(share / np.pi / aspect)
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _gradient(scene: Scene) -> np.ndarray:
    """(H, W, 1) float32 brightness factor of a ``gradient`` layout (ones for the others)."""
    if scene.layout != "gradient":
        return np.ones((scene.height, scene.width, 1), dtype=np.float32)
    rng = np.random.default_rng([scene.texture_seed, 0x96AD])
    angle = float(rng.uniform(0, 2 * np.pi))
    yy, xx = np.mgrid[0 : scene.height, 0 : scene.width].astype(np.float32)
    along = np.cos(angle) * xx / scene.width + np.sin(angle) * yy / scene.height
    t = (along - along.min()) / max(float(along.max() - along.min()), 1e-6)
    low, high = GRADIENT_RANGE
    return (low + (high - low) * t)[..., None].astype(np.float32)


def _background(scene: Scene) -> np.ndarray:
    """(H, W, 3) float32 background with the scene's layout and texture."""
    if scene.layout not in LAYOUTS:
        raise ValueError(f"unknown background layout {scene.layout!r}; use one of {LAYOUTS}")
    if (scene.layout == "regions") != (scene.second is not None):
        raise ValueError("a 'regions' layout needs a second colour, and only it takes one")
    base = np.array(BACKGROUND_COLOURS[scene.background], dtype=np.float32)
    img = np.broadcast_to(base, (scene.height, scene.width, 3)).copy()
    if scene.second is not None:
        img[second_region(scene)] = BACKGROUND_COLOURS[scene.second]
    img *= _gradient(scene)
    rng = np.random.default_rng(scene.texture_seed)
    yy, xx = np.mgrid[0 : scene.height, 0 : scene.width]
    if scene.texture == "stripes":
        period = int(rng.integers(3, 7))
        coord = yy if rng.random() < 0.5 else xx
        img += 14.0 * ((coord // max(1, period // 2)) % 2)[..., None]
    elif scene.texture == "noise":
        img += rng.normal(0.0, float(rng.choice([3.0, 6.0])), size=img.shape).astype(np.float32)
    elif scene.texture == "checker":
        cell = int(rng.integers(2, 5))
        img += 12.0 * (((yy // cell) + (xx // cell)) % 2)[..., None]
    elif scene.texture != "plain":
        raise ValueError(f"unknown texture {scene.texture!r}; use one of {TEXTURES}")
    return img


def render(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Draw a scene.

    Returns:
        image: (H, W, 3) uint8 RGB pixels.
        object_map: (H, W) int64; 0 for background, ``i + 1`` where object ``i`` of
            ``scene.objects`` is drawn (the whole plate for the text object).
    """
    img = _background(scene)
    omap = np.zeros((scene.height, scene.width), dtype=np.int64)
    for i, obj in enumerate(scene.objects):
        y, x, h, w = obj.box
        if obj.kind == TEXT_KIND:
            img[y : y + h, x : x + w] = PLATE_COLOUR
            g = glyph(obj.digit or "0")
            ink = img[y + 1 : y + 1 + g.shape[0], x + 1 : x + 1 + g.shape[1]]
            ink[g] = INK_COLOUR
            omap[y : y + h, x : x + w] = i + 1
        else:
            m = _shape_mask(obj.kind, h, w)
            colour = np.array(SHAPE_COLOURS[obj.colour], dtype=np.float32)
            box = img[y : y + h, x : x + w]
            tinted = m & _pattern_mask(SHAPE_PATTERNS[obj.kind], y, x, h, w)
            box[m & ~tinted] = colour
            tint = SHAPE_TINTS[obj.kind]
            box[tinted] = (1 - tint) * colour + tint * 255.0
            omap[y : y + h, x : x + w][m] = i + 1
    return np.clip(img, 0, 255).astype(np.uint8), omap
