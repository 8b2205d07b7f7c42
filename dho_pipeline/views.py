"""Augmented views: which part of an image a view shows, and how a view becomes model input.

A view is a box `[x0, y0, x1, y1]` in fractions of the original image's width (x) and height (y),
plus a horizontal-flip bit. Boxes are stored as uint16 (fraction * 65535), and every view is rendered
from the *stored* box, so the teacher (stage one) and the student (stage two) crop exactly the same
region: crop the box, resize the crop to the model's input size (bicubic, antialiased, no further
cropping), then mirror it if the flip bit is set. Normalisation happens on the device.

Two switches reproduce the DHO reference's resampling (train_imgnet_semi.py, `DualSizeDataset`):
`render_view(..., via=(378, 378))` renders a training view at the teacher's size first and resizes that
to the student's (crop -> 378 -> 224, two bicubic resizes; ours: crop -> 224 once), and
`render_reference_eval` is its evaluation view (shorter side to 378 bilinear, centre crop 378, bicubic
to 224; ours: the centred square, one bicubic resize). docs/fidelity.md measures the differences.

View 0 is the teacher's evaluation view: the whole image for teachers that squash-resize (DFN5B),
the centred square for teachers that resize the shortest side and centre-crop (OpenAI CLIP).
Views 1..V-1 are RandomResizedCrop boxes (scale and aspect ratio as torchvision draws them, computed
in continuous coordinates) with a flip at p = 0.5, drawn from a generator seeded by
(seed, shard name, key, view index): the same sample always gets the same views, whichever process,
worker or run draws them.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

BOX_SCALE = 65535  # stored box value = round(fraction * BOX_SCALE), as uint16
VIEW0_WHOLE = "whole"
VIEW0_CENTER_SQUARE = "center-square"
RESIZE_TO_VIEW0 = {"squash": VIEW0_WHOLE, "shortest": VIEW0_CENTER_SQUARE}
RESIZE_MODES = tuple(RESIZE_TO_VIEW0)  # how a model brings an image to its input size: squash, or shortest side + centre crop
EVAL_VIEWS = ("center-square", "reference")  # a student's evaluation view: ours, or the reference's chain
TRAIN_RESIZES = ("direct", "reference")  # a training view: crop -> student size, or crop -> teacher size -> student size
REFERENCE_EVAL_SIZE = 378  # the reference's shared evaluation resolution (its DFN5B teacher's input size)


@dataclass(frozen=True, kw_only=True)
class ViewPolicy:
    """How views are drawn. Stored in the cache so that a reader knows what it holds."""

    num_views: int  # views per image, view 0 included
    seed: int
    view0: str  # VIEW0_WHOLE or VIEW0_CENTER_SQUARE
    crop_scale: tuple[float, float] = (0.5, 1.0)  # area fraction of RandomResizedCrop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio (w/h, in pixels)
    flip_probability: float = 0.5

    def __post_init__(self):
        if self.num_views < 1:
            raise ValueError("num_views must be at least 1")
        if self.view0 not in (VIEW0_WHOLE, VIEW0_CENTER_SQUARE):
            raise ValueError(f"view0 must be {VIEW0_WHOLE!r} or {VIEW0_CENTER_SQUARE!r}")

    def to_json(self) -> dict:
        return {**asdict(self), "crop_scale": list(self.crop_scale), "crop_ratio": list(self.crop_ratio)}


def _stable_words(text: str) -> list[int]:
    """Two 32-bit words from a string, identical in every process (unlike Python's hash())."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return [int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")]


def view_generator(seed: int, shard_name: str, key: str, view: int) -> np.random.Generator:
    entropy = [seed & 0xFFFFFFFF, *_stable_words(shard_name), *_stable_words(key), view]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def _random_resized_crop(rng: np.random.Generator, width: int, height: int, policy: ViewPolicy):
    """torchvision's RandomResizedCrop.get_params, in continuous pixel coordinates.

    Returns (x0, y0, x1, y1) in pixels.
    """
    area = width * height
    log_ratio = (math.log(policy.crop_ratio[0]), math.log(policy.crop_ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*policy.crop_scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = math.sqrt(target_area * aspect)
        h = math.sqrt(target_area / aspect)
        if 0 < w <= width and 0 < h <= height:
            x0 = rng.uniform(0, width - w)
            y0 = rng.uniform(0, height - h)
            return x0, y0, x0 + w, y0 + h
    # Fallback (as torchvision): the largest centred box whose ratio lies in crop_ratio.
    ratio = width / height
    if ratio < policy.crop_ratio[0]:
        w, h = width, width / policy.crop_ratio[0]
    elif ratio > policy.crop_ratio[1]:
        w, h = height * policy.crop_ratio[1], height
    else:
        w, h = width, height
    x0, y0 = (width - w) / 2, (height - h) / 2
    return x0, y0, x0 + w, y0 + h


def _view0_box(width: int, height: int, view0: str):
    if view0 == VIEW0_WHOLE or width == height:
        return 0.0, 0.0, float(width), float(height)
    side = min(width, height)
    x0, y0 = (width - side) / 2, (height - side) / 2
    return x0, y0, x0 + side, y0 + side


def quantize_box(x0: float, y0: float, x1: float, y1: float, width: int, height: int) -> np.ndarray:
    fractions = np.array([x0 / width, y0 / height, x1 / width, y1 / height])
    return np.round(np.clip(fractions, 0.0, 1.0) * BOX_SCALE).astype(np.uint16)


def draw_view(policy: ViewPolicy, shard_name: str, key: str, view: int, width: int, height: int):
    """One view of one image: box (uint16 [4]) and flip. View 0 is the evaluation view."""
    if view == 0:
        return quantize_box(*_view0_box(width, height, policy.view0), width, height), False
    rng = view_generator(policy.seed, shard_name, key, view)
    box = quantize_box(*_random_resized_crop(rng, width, height, policy), width, height)
    return box, bool(rng.uniform() < policy.flip_probability)


def draw_views(policy: ViewPolicy, shard_name: str, key: str, width: int, height: int):
    """All views of one image: boxes (uint16 [V, 4]) and flips (bool [V])."""
    drawn = [draw_view(policy, shard_name, key, v, width, height) for v in range(policy.num_views)]
    return np.stack([box for box, _ in drawn]), np.array([flip for _, flip in drawn], dtype=bool)


def center_box(width: int, height: int, fraction: float = 1.0) -> np.ndarray:
    """The centred square (uint16 box): a student's evaluation view, resize-shortest + centre-crop. With
    `fraction` < 1 the square's side is that share of the shorter side (timm's crop_pct: resize the
    shorter side to size / crop_pct, then centre-crop size)."""
    x0, y0, x1, y1 = _view0_box(width, height, VIEW0_CENTER_SQUARE)
    if fraction != 1.0:
        side = min(width, height) * fraction
        x0, y0 = (width - side) / 2, (height - side) / 2
        x1, y1 = x0 + side, y0 + side
    return quantize_box(x0, y0, x1, y1, width, height)


def box_fractions(box: np.ndarray) -> list[float]:
    return [float(v) / BOX_SCALE for v in box]


def _snap(pixel: float) -> float:
    """Undo uint16 rounding: an edge within 0.01 px of a whole pixel is that pixel (the rounding
    error is below 0.001 px for images up to 65k pixels wide), so whole-pixel boxes stay whole."""
    nearest = round(pixel)
    return float(nearest) if abs(pixel - nearest) < 0.01 else pixel


def render_view(image: Image.Image, box: np.ndarray, flip: bool, size: tuple[int, int],
                via: tuple[int, int] | None = None) -> np.ndarray:
    """Crop `box` (uint16 fractions) out of an RGB image, resize to `size` = (height, width), flip.

    Returns uint8 [height, width, 3]. The box keeps its fractional edges (no rounding to whole
    pixels); PIL's bicubic filter antialiases when it shrinks. With `via`, the view is rendered (and
    flipped) at that size first and then resized to `size`, bicubic, as the reference's student views are.
    """
    if via is not None and tuple(via) != tuple(size):
        rendered = Image.fromarray(render_view(image, box, flip, via))
        return np.asarray(rendered.resize((size[1], size[0]), Image.Resampling.BICUBIC), dtype=np.uint8)
    width, height = image.size
    fx0, fy0, fx1, fy1 = box_fractions(box)
    x0, y0, x1, y1 = (_snap(v) for v in (fx0 * width, fy0 * height, fx1 * width, fy1 * height))
    # Crop first (to whole pixels around the box), so that no pixel outside the box's pixels enters
    # the bicubic filter; then resize the fractional box inside that crop.
    left, top = math.floor(x0), math.floor(y0)
    right, bottom = max(math.ceil(x1), left + 1), max(math.ceil(y1), top + 1)
    crop = image.crop((left, top, right, bottom))
    view = crop.resize((size[1], size[0]), Image.Resampling.BICUBIC, box=(x0 - left, y0 - top, x1 - left, y1 - top))
    if flip:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(view, dtype=np.uint8)


def render_reference_eval(image: Image.Image, size: tuple[int, int], via: int = REFERENCE_EVAL_SIZE) -> np.ndarray:
    """The reference's evaluation view of an RGB image, uint8 [height, width, 3]: the shorter side resized to
    `via` (bilinear, torchvision's default; the longer side truncated to an integer), the centred `via` x
    `via` square cropped (offsets rounded as torchvision rounds them), resized to `size` (bicubic). A
    resize to the size an image already has is skipped, as torchvision skips it."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    scaled = (via, int(via * long / short)) if width <= height else (int(via * long / short), via)
    if scaled != image.size:
        image = image.resize(scaled, Image.Resampling.BILINEAR)
    left, top = int(round((image.width - via) / 2.0)), int(round((image.height - via) / 2.0))
    image = image.crop((left, top, left + via, top + via))
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def describe_decode_error(error: BaseException) -> str:
    """One line for why image bytes did not decode (PIL's own messages name a BytesIO object)."""
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):
        return "not a recognised image format"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def decode_rgb(data: bytes) -> Image.Image:
    """Decode image bytes fully (so corruption surfaces here, not later) and convert to 8-bit RGB.

    Every stage and `predict` decode through here, so they all see the same pixels:
    - 16-bit samples keep their high byte (v >> 8), as Pillow decodes 16-bit RGB(A) PNGs; its own
      conversion of 16-bit greyscale (modes I;16*, I) would clip every value above 255 to white.
    - EXIF orientation is ignored, as torchvision's and timm's ImageNet loaders (and the DHO reference)
      ignore it: an image is used as its pixels are stored.
    """
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """An image in any mode as 8-bit RGB, the way decode_rgb converts it (also for PIL images given to the
    Python API): 16-bit samples keep their high byte."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        grey = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
        return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")
