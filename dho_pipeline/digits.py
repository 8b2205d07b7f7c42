"""scikit-learn's handwritten digits (1,797 real 8x8 images, shipped inside the package) as RGB images.

The demo's stand-in for ImageNet: no download, real images, ten classes.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def load_digit_images(size: int = 32) -> tuple[list[Image.Image], np.ndarray]:
    """All 1,797 digits, upsampled (bicubic) to size x size RGB, dark ink on white; and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = []
    for pixels in digits.images:
        gray = (255 - pixels * (255 / 16)).clip(0, 255).astype(np.uint8)
        images.append(Image.fromarray(gray).resize((size, size), Image.Resampling.BICUBIC).convert("RGB"))
    return images, digits.target.astype(np.int64)
