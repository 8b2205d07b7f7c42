"""Shared pieces of the benchmarks: synthetic CLIP-like logits, generated JPEG shards, timing, output.

`save(name, figures)` writes the figures with where they came from (`provenance()`): the command, the git
commit (sha, and whether the tree differed from it), the machine, the load average and the date.
(A minimal version, written on branch issue-17; main is getting a fuller provenance writer with the same
`save` signature, which replaces this one when the branches meet.)"""

from __future__ import annotations

import io
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def clip_like_logits(rows: int, classes: int = 1000, seed: int = 0) -> np.ndarray:
    """100 x cosines as a zero-shot CLIP produces them (NOTES section 5): unrelated classes around
    0.17 +- 0.025, 8 related classes around 0.22, the true class around 0.29."""
    rng = np.random.default_rng(seed)
    cos = 0.17 + 0.025 * rng.standard_normal((rows, classes))
    for row in range(rows):
        related = rng.choice(classes, size=9, replace=False)
        cos[row, related[1:]] = 0.22 + 0.02 * rng.standard_normal(8)
        cos[row, related[0]] = 0.29 + 0.02 * rng.standard_normal()
    return (100 * cos).astype(np.float32)


def structured_clip_like_logits(rows: int, classes: int = 1000, seed: int = 0) -> np.ndarray:
    """A teacher whose tail has structure: each image is near some classes and far from most, with
    cosines falling smoothly with a per-class distance (0.29 for the true class, down to ~0.12)."""
    rng = np.random.default_rng(seed)
    distance = rng.uniform(0, 1, (rows, classes)) ** 0.5  # few near classes, many far ones
    cos = 0.12 + 0.12 * np.exp(-distance / 0.25) + 0.01 * rng.standard_normal((rows, classes))
    cos[np.arange(rows), rng.integers(0, classes, rows)] = 0.29
    return (100 * cos).astype(np.float32)


def write_jpeg_shards(folder: Path, shards: int, per_shard: int, size=(500, 375), seed: int = 0,
                      num_classes: int = 1000) -> list[Path]:
    """ImageNet-like JPEG shards (500 x 375, quality 90) of smooth random content, random labels."""
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        path = folder / f"bench-{s:06d}.tar"
        if not path.exists():
            with wds.TarWriter(str(path), mtime=0) as writer:
                for i in range(per_shard):
                    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
                    noise = rng.integers(-12, 12, (size[1], size[0], 3))
                    image = np.asarray(Image.fromarray(small).resize(size, Image.Resampling.BICUBIC), dtype=np.int64)
                    image = Image.fromarray(np.clip(image + noise, 0, 255).astype(np.uint8))
                    buffer = io.BytesIO()
                    image.save(buffer, format="JPEG", quality=90)
                    writer.write({"__key__": f"s{s}_{i:05d}", "jpg": buffer.getvalue(), "cls": int(rng.integers(0, num_classes))})
        paths.append(path)
    return paths


def write_class_lists(folder: Path) -> tuple[Path, Path]:
    """1000 class names and one template, as ImageNet-sized inputs for cache-teacher."""
    classes, templates = folder / "classes.txt", folder / "templates.txt"
    classes.write_text("\n".join(f"class {i}" for i in range(1000)) + "\n")
    templates.write_text("a photo of a {}.\n")
    return classes, templates


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def peak_rss_mb(children: bool = False) -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    return usage.ru_maxrss / 1024


def git_commit() -> dict:
    """HEAD and whether the working tree differs from it (read-only git calls: no index lock)."""
    def git(*words: str) -> str:
        return subprocess.run(["git", "--no-optional-locks", "-C", str(REPO), *words], capture_output=True, text=True,
                              check=True).stdout

    try:
        sha, status = git("rev-parse", "HEAD").strip(), git("status", "--porcelain").splitlines()
    except (OSError, subprocess.CalledProcessError):
        return {"sha": None, "dirty": None}
    changed = [line[3:] for line in status if not line[3:].startswith(("bench/results/", "bench-out/"))]
    return {"sha": sha, "dirty": bool(changed), "dirty_files": changed[:40]}


# What was measured is the code as it was when the script started.
_STARTED = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "load": os.getloadavg(),
            "commit": git_commit()}


def provenance() -> dict:
    words = [sys.executable, *sys.argv]
    def relative(word: str) -> str:  # the interpreter and script as typed from the repository root
        full = Path(os.path.abspath(word))
        return str(full.relative_to(REPO)) if full.exists() and full.is_relative_to(REPO) else word

    words = [relative(w) for w in words[:2]] + words[2:]
    return {
        "command": shlex.join(words),
        "commit": _STARTED["commit"],
        "machine": machine(),
        "load_average": {"start": [round(x, 2) for x in _STARTED["load"]], "end": [round(x, 2) for x in os.getloadavg()]},
        "date": {"start": _STARTED["date"], "end": datetime.now(timezone.utc).isoformat(timespec="seconds")},
    }


def save(name: str, figures: dict, out: Path | None = None, quiet: bool = False) -> Path:
    """Write the figures with their provenance to <out or $BENCH_OUT or bench-out>/<name>.json."""
    folder = Path(out) if out is not None else Path(os.environ.get("BENCH_OUT", "bench-out"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps({**provenance(), **figures}, indent=2) + "\n")
    if not quiet:
        print(f"wrote {path}")
    return path


class Timer:
    def __enter__(self):
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.started
