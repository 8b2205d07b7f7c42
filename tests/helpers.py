"""Test helpers: generated WebDataset shards, tiny class and template lists, CLI runners, datasets
made through the command line. Test modules import them from here (`from helpers import ...`);
conftest.py holds only fixtures."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

from dho_pipeline.stages.cli import main as cli_main

BIN = Path(sys.executable).parent
CLASSNAMES = ["cat", "dog", "bird", "fish", "frog"]
TEMPLATES = ["a photo of a {}.", "art of the {}."]
TINY_TEACHER = ["--teacher", "dho-test-vit", "--pretrained", "none"]


OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's OPENAI_DATASET_MEAN / STD, written out
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def openai_normalized(pixels):
    """uint8 [N, H, W, 3] pixels (numpy or torch) -> float [N, 3, H, W], (x / 255 - mean) / std with the
    OpenAI constants, written out here as the model card does (not the library's Normalizer)."""
    import torch

    x = torch.as_tensor(np.array(pixels)).permute(0, 3, 1, 2).float() / 255  # a copy: inputs may be read-only
    return (x - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)


def image_bytes(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def random_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    # Smooth random colour fields: JPEG-friendly and with structure a crop changes.
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def write_shards(
    folder: Path,
    num_shards: int = 3,
    per_shard: int = 6,
    *,
    seed: int = 0,
    ext: str = "jpg",
    num_classes: int = len(CLASSNAMES),
    label_member: str = "cls",
    prefix: str = "shard",
) -> list[Path]:
    """Write small shards of random images of varied sizes; returns their paths."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext.lower()]
    paths = []
    for s in range(num_shards):
        path = folder / f"{prefix}-{s:06d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for i in range(per_shard):
                width, height = (int(v) for v in rng.integers(24, 96, size=2))
                sample = {"__key__": f"s{s}_img{i:04d}", ext: image_bytes(random_image(rng, width, height), fmt)}
                label = int(rng.integers(0, num_classes))
                if label_member == "cls":
                    sample["cls"] = label
                elif label_member == "json":
                    sample["json"] = json.dumps({"label": label}).encode()
                writer.write(sample)
        paths.append(path)
    return paths


def write_lists(folder: Path, classnames=CLASSNAMES, templates=TEMPLATES) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    classes_path, templates_path = folder / "classes.txt", folder / "templates.txt"
    classes_path.write_text("\n".join(classnames) + "\n")
    templates_path.write_text("\n".join(templates) + "\n")
    return classes_path, templates_path


def cli(*args, expect_exit: int | None = 0):
    """Run the CLI in-process; returns the click Result."""
    result = CliRunner().invoke(cli_main, [str(a) for a in args], catch_exceptions=False)
    if expect_exit is not None:
        assert result.exit_code == expect_exit, result.output
    return result


def run_command(*args, env=None, timeout=300, check=True) -> subprocess.CompletedProcess:
    """Run a command in a subprocess (for torchrun and kill tests)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=full_env, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def labeled_dataset(root: Path, num_shards: int = 3, per_shard: int = 6, seed: int = 0) -> dict:
    """Labeled JPEG shards (root/shards), their manifest, and tiny class/template lists."""
    shards = write_shards(root / "shards", num_shards=num_shards, per_shard=per_shard, seed=seed)
    classes, templates = write_lists(root)
    manifest = root / "manifest.json"
    cli("manifest", str(root / "shards" / "*.tar"), "--out", manifest)
    return {"root": root, "shards": shards, "manifest": manifest, "classes": classes, "templates": templates}


def cached_dataset(root: Path, *, num_shards: int, per_shard: int, cache_options=("--views", "1", "--topk", "3"),
                   split_options=("--percent", "25")) -> dict:
    """labeled_dataset plus its tiny-teacher cache (c.zarr) and a label split (s.json), made through the CLI."""
    data = labeled_dataset(root, num_shards, per_shard)
    cli(*cache_args(data, root / "c.zarr", *cache_options))
    cli("split", "--manifest", data["manifest"], *split_options, "--out", root / "s.json")
    return {**data, "cache": root / "c.zarr", "split": root / "s.json"}


def training_data(root: Path, *, num_shards: int, per_shard: int, eval_per_shard: int) -> dict:
    """cached_dataset (2 views, top-3, 25% labeled, 1 per class held out) plus a separate eval manifest."""
    data = cached_dataset(root, num_shards=num_shards, per_shard=per_shard, cache_options=("--views", "2", "--topk", "3"),
                          split_options=("--percent", "25", "--holdout", "1"))
    write_shards(root / "eval", num_shards=1, per_shard=eval_per_shard, seed=5, prefix="eval")
    cli("manifest", str(root / "eval" / "*.tar"), "--out", root / "eval.json")
    return {**data, "eval": root / "eval.json"}


def manifest_of_classes(folder: Path, *, per_shard: int, num_classes: int = 5) -> Path:
    """4 generated shards of `per_shard` images over `num_classes` classes, and their manifest."""
    write_shards(folder / "d", num_shards=4, per_shard=per_shard, num_classes=num_classes)
    cli("manifest", str(folder / "d" / "*.tar"), "--out", folder / "m.json")
    return folder / "m.json"


def labels_of(manifest_path: Path, chosen: dict) -> list[int]:
    """The labels of the samples `chosen` names ({shard name: positions}, as a split records them)."""
    from dho_pipeline.manifest import load_manifest

    manifest = load_manifest(manifest_path)
    return [s.labels[p] for s in manifest.shards for p in chosen.get(s.name, [])]


def cache_args(data: dict, out: Path, *extra) -> list:
    """cache-teacher on generated data with the tests' class list. Random labels on a few images need
    not reach its last class, so the tests allow unused classes (test_first_run checks the refusal)."""
    return [
        "cache-teacher", "--manifest", data["manifest"], "--out", out, *TINY_TEACHER,
        "--classnames", data["classes"], "--templates", data["templates"], "--workers", "0",
        "--allow-unused-classes", *extra,
    ]


def dump(cache: Path) -> list[dict]:
    return [json.loads(line) for line in cli("cache", "dump", cache).stdout.splitlines()]
