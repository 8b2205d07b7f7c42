"""The whole pipeline on real images in minutes, on a CPU, offline: scikit-learn's handwritten digits.

    dho-pipeline demo --out demo-out

Steps (each through the same code path as the ImageNet recipe):
1. digits -> WebDataset shards, in a fixed three-way split: `pretrain` (only for making the tiny
   CLIPs), `train` (semi-supervised distillation), `test` (untouched until the final evaluation);
2. manifest of the train part;
3. cache-teacher: the tiny teacher, several views per image, into a Zarr cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import click

DIGIT_TEMPLATES = ["a photo of the number {}.", "a handwritten {}.", "the digit {}."]
SPLIT_SIZES = {"pretrain": 600, "train": 800, "test": 397}  # 1,797 digits in all


@dataclass(frozen=True, kw_only=True)
class Config:
    out: Path = Path("demo-out")
    image_size: int = 32  # digits are upsampled from 8x8 to this, RGB
    views: int = 4  # cached teacher views per training image
    shard_size: int = 200  # samples per shard
    seed: int = 0  # the three-way split and everything downstream


def _step(name: str):
    click.echo(f"[demo] {name} ...", err=True)
    return time.perf_counter()


def write_digit_shards(config: Config) -> dict[str, list[Path]]:
    """The three parts as shards: out/data/<part>-NNNNNN.tar. Deterministic for a given seed."""
    import io

    import numpy as np

    from dho_pipeline.digits import load_digit_images
    from dho_pipeline.shard_writer import SampleSource, write_shards

    images, labels = load_digit_images(config.image_size)
    order = np.random.default_rng(config.seed).permutation(len(images))
    parts, start = {}, 0
    for part, size in SPLIT_SIZES.items():
        samples = []
        for index in order[start : start + size]:
            buffer = io.BytesIO()
            images[index].save(buffer, format="PNG")
            samples.append(SampleSource(key=f"digit{index:04d}", ext="png", label=int(labels[index]), data=buffer.getvalue()))
        parts[part] = write_shards(samples, str(config.out / "data" / f"{part}-%06d.tar"), maxcount=config.shard_size, maxsize=1e9)
        start += size
    return parts


def run(config: Config) -> dict:
    from dho_pipeline.digits import CLASSNAMES

    from . import cache_teacher, manifest

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (out / "templates.txt").write_text("\n".join(DIGIT_TEMPLATES) + "\n")
    results: dict = {"steps": {}}

    started = _step("writing digit shards (pretrain / train / test)")
    parts = write_digit_shards(config)
    results["steps"]["shards"] = round(time.perf_counter() - started, 2)

    started = _step("manifest of the train part")
    manifest.run(manifest.Config(shards=tuple(str(p) for p in parts["train"]), out=out / "train.json"))
    results["steps"]["manifest"] = round(time.perf_counter() - started, 2)

    started = _step(f"cache-teacher ({config.views} views per image)")
    summary = cache_teacher.run(cache_teacher.Config(
        manifest=out / "train.json", out=out / "teacher.zarr", teacher="dho-tiny-teacher", pretrained="none",
        classnames=out / "classnames.txt", templates=out / "templates.txt", views=config.views, topk=None,
        workers=0, seed=config.seed,
    ))
    results["steps"]["cache_teacher"] = round(time.perf_counter() - started, 2)
    results["cache"] = summary
    return results
