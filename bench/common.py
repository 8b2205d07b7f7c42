"""Shared pieces of the benchmarks: where a figure came from, synthetic logits, generated shards, timing.

Every benchmark writes its figures with `save(name, figures)`: one JSON per script, under `$BENCH_OUT`
(default `bench-out/`; the published figures are runs with `BENCH_OUT=bench/results/<machine>-<date>`).
Besides the figures, each JSON records its provenance (`provenance()`):

    command        the command line that produced it (with BENCH_OUT when set)
    commit         {"sha": git rev-parse HEAD, "dirty": uncommitted changes?, "dirty_files": [...]} when the
                   script started (and "changed_during_run" with the state at the save, if it differs)
    machine        CPU model, cores, memory, Python, torch (and the GPU, if one is used)
    load_average   the 1/5/15-minute load at the script's start and at the save (the 2 cores are shared)
    date           UTC start and save time
"""

from __future__ import annotations

import io
import json
import math
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

from dho_pipeline.jsonfiles import write_text_atomically  # noqa: E402  (the repository first on the path)

PROVENANCE_KEYS = ("command", "commit", "machine", "load_average", "date")


# ---- provenance -----------------------------------------------------------------------------------


def command_line() -> str:
    """The command as typed from the repository root (interpreter and script relative to it)."""
    def relative(path: str) -> str:
        try:
            return str(Path(os.path.normpath(path)).relative_to(REPO)) if os.path.isabs(path) else path
        except ValueError:
            return path

    words = [relative(sys.executable), relative(sys.argv[0]), *sys.argv[1:]]
    prefix = f"BENCH_OUT={shlex.quote(os.environ['BENCH_OUT'])} " if os.environ.get("BENCH_OUT") else ""
    return prefix + shlex.join(words)


def git_commit() -> dict:
    """HEAD and whether the working tree differs from it. On a machine without the repository's git
    (the GPU machine gets a copy of the tree), BENCH_COMMIT=<sha>[-dirty] set by the launcher is used."""
    given = os.environ.get("BENCH_COMMIT")

    def git(*words: str) -> str:  # read-only: no index refresh, no lock (others commit in this checkout)
        return subprocess.run(["git", "--no-optional-locks", "-C", str(REPO), *words], capture_output=True, text=True,
                              check=True).stdout

    try:
        sha, status = git("rev-parse", "HEAD").strip(), git("status", "--porcelain").splitlines()
    except (OSError, subprocess.CalledProcessError):
        if given:
            return {"sha": given.removesuffix("-dirty"), "dirty": given.endswith("-dirty"), "source": "BENCH_COMMIT"}
        return {"sha": None, "dirty": None, "source": "no git repository here and no BENCH_COMMIT"}
    # The results folder itself is not code: a run that writes into it is not "dirty" because of that.
    changed = [line[3:] for line in status if not line[3:].startswith("bench/results/")]
    return {"sha": sha, "dirty": bool(changed), "dirty_files": changed[:40], "source": "git"}


def machine() -> dict:
    info = {"cpu": _cpu_model(), "cores": os.cpu_count(), "memory_gb": _memory_gb(),
            "python": platform.python_version(), "platform": platform.platform()}
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        return round(kb / 2**20, 1)
    except (OSError, IndexError, ValueError):
        return None


# What was measured is the code as it was when the script started.
_STARTED = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "load": os.getloadavg(),
            "clock": time.perf_counter(), "commit": git_commit()}


def provenance() -> dict:
    commit = dict(_STARTED["commit"])
    at_end = git_commit()
    if (at_end["sha"], at_end["dirty_files"] if "dirty_files" in at_end else None) != \
            (commit["sha"], commit.get("dirty_files")):
        commit["changed_during_run"] = at_end  # someone committed or edited code while this ran
    return {
        "command": command_line(),
        "commit": commit,
        "machine": machine(),
        "load_average": {"start": [round(x, 2) for x in _STARTED["load"]],
                         "end": [round(x, 2) for x in os.getloadavg()]},
        "date": {"start": _STARTED["date"], "end": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        "seconds": round(time.perf_counter() - _STARTED["clock"], 1),
    }


def out_folder() -> Path:
    return Path(os.environ.get("BENCH_OUT", "bench-out"))


def save(name: str, figures: dict, out: Path | None = None, quiet: bool = False) -> Path:
    """Write `figures` with their provenance to <out>/<name>.json (atomically: a reader never sees half)."""
    folder = Path(out) if out is not None else out_folder()
    folder.mkdir(parents=True, exist_ok=True)
    clash = set(figures) & set(PROVENANCE_KEYS)
    if clash:
        raise ValueError(f"figure names {sorted(clash)} are reserved for provenance")
    path = folder / f"{name}.json"
    write_text_atomically(path, json.dumps(_finite({**provenance(), **figures}), indent=2, default=_plain,
                                           allow_nan=False) + "\n")
    if not quiet:
        print(f"wrote {path}")
    return path


def _finite(value):
    """NaN and infinities as null (JSON has no such numbers), in nested dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _plain(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def run_demo(out: Path, *options: str) -> dict:
    """`dho-pipeline demo --out OUT OPTIONS --json` in a child process: its results, plus under "measured"
    the wall and CPU seconds (all its processes) it took and the load around it (the cores are shared)."""
    load = os.getloadavg()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run([str(Path(sys.executable).parent / "dho-pipeline"), "demo", "--out", str(out), *options,
                             "--json"], capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        sys.exit(f"demo {' '.join(options)} failed:\n{result.stderr[-2000:]}")
    results = json.loads(result.stdout)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    results["measured"] = {
        "wall_seconds": round(wall, 1), "cpu_seconds": round(user + system, 1),
        "user_seconds": round(user, 1), "system_seconds": round(system, 1),
        "load_average_at_start": [round(x, 2) for x in load],
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    return results


# ---- synthetic teacher logits ---------------------------------------------------------------------


def clip_like_logits(rows: int, classes: int = 1000, seed: int = 0) -> np.ndarray:
    """100 x cosines shaped like a zero-shot CLIP's over 1000 ImageNet classes: unrelated classes around
    0.17 +- 0.025, 8 related classes around 0.22, the true class around 0.29 (at T = 2 this leaves about
    two thirds of the mass outside the top 10). Every row is drawn independently."""
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


class LatentClip:
    """A synthetic CLIP over 1000 classes in which views of one image are correlated and a student can
    differ from the teacher systematically.

    Unit class embeddings in `dim` dimensions, in 100 clusters of 10 related classes; an image embedding
    is its class's embedding plus an image-specific direction (shared by all its views) plus a
    view-specific one. Logits are 100 * (0.17 + 0.2 * cosine), which puts unrelated classes at
    0.17 +- 0.025, the other 9 classes of the cluster around 0.22 and the true class around 0.28, the
    CLIP-like levels of `clip_like_logits`. A student is another model of the same images: a low-rank
    distortion of the image and class embeddings (the same for every image: structured errors), an
    image-specific error shared by the image's views, and its own logit scale.
    """

    def __init__(self, images: int, views: int, classes: int = 1000, dim: int = 64, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.rng, self.dim, self.views = rng, dim, views
        centres = _unit(rng.standard_normal((classes // 10, dim)))
        self.classes = _unit(np.repeat(centres, 10, axis=0) + 1.2 * _unit(rng.standard_normal((classes, dim))))
        self.labels = rng.integers(0, classes, images)
        image_part = 1.25 * _unit(rng.standard_normal((images, 1, dim)))  # shared by the image's views
        view_part = 0.75 * _unit(rng.standard_normal((images, views, dim)))
        self.embeddings = _unit(self.classes[self.labels][:, None, :] + image_part + view_part)  # [I, V, dim]

    def teacher_logits(self) -> np.ndarray:
        """[images * views, classes] float32."""
        return self._logits(self.embeddings, self.classes, 0.2)

    def student_logits(self, distortion: float, image_error: float, scale: float = 0.2, rank: int = 8,
                       seed: int = 1) -> np.ndarray:
        """Another model's logits for the same views: embeddings mapped through I + distortion * (a random
        rank-`rank` map), plus image_error * an error direction per image (shared by its views)."""
        rng = np.random.default_rng(seed)
        images = self.embeddings.shape[0]

        def low_rank_map():
            u, v = rng.standard_normal((self.dim, rank)), rng.standard_normal((rank, self.dim))
            return np.eye(self.dim) + distortion * (u @ v) / np.sqrt(rank * self.dim)

        image_map, class_map = low_rank_map(), low_rank_map()
        error = image_error * _unit(rng.standard_normal((images, 1, self.dim)))
        embeddings = _unit(self.embeddings @ image_map.T + error)
        return self._logits(embeddings, _unit(self.classes @ class_map.T), scale)

    @staticmethod
    def _logits(embeddings: np.ndarray, classes: np.ndarray, scale: float) -> np.ndarray:
        cos = 0.17 + scale * (embeddings @ classes.T)
        return (100 * cos).reshape(-1, classes.shape[0]).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---- generated data -------------------------------------------------------------------------------


def jpeg_shard(job: tuple) -> str:
    """One ImageNet-like shard, written by the project's own shard writer: smooth random content plus
    noise, JPEG quality 90, random labels, keys unique across shards. `job` = (folder, index, per_shard,
    (width, height), num_classes, seed); a top-level function so that a process pool can run it."""
    from PIL import Image

    from dho_pipeline.shard_writer import SampleSource, write_shards

    folder, index, per_shard, (width, height), num_classes, seed = job
    pattern = str(Path(folder) / f"bench-{index:06d}-%d.tar")  # one shard per call: always ...-0.tar
    if Path(pattern % 0).exists():
        return pattern % 0
    rng = np.random.default_rng([seed, index])

    def samples():
        for i in range(per_shard):
            small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
            image = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC), np.int16)
            image = image + rng.integers(-12, 12, (height, width, 3), dtype=np.int16)
            buffer = io.BytesIO()
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
            yield SampleSource(key=f"s{index:04d}_{i:05d}", ext="jpg", label=int(rng.integers(0, num_classes)),
                               data=buffer.getvalue())

    (written,) = write_shards(samples(), pattern, maxcount=per_shard, maxsize=1e12)
    return str(written)


def write_jpeg_shards(folder: Path, shards: int, per_shard: int, size=(500, 375), seed: int = 0,
                      num_classes: int = 1000) -> list[Path]:
    """`shards` ImageNet-like JPEG shards (default 500 x 375) in `folder`, written one after another."""
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(jpeg_shard((str(folder), s, per_shard, tuple(size), num_classes, seed))) for s in range(shards)]


def write_class_lists(folder: Path) -> tuple[Path, Path]:
    """1000 class names and one template, as ImageNet-sized inputs for cache-teacher."""
    classes, templates = folder / "classes.txt", folder / "templates.txt"
    classes.write_text("\n".join(f"class {i}" for i in range(1000)) + "\n")
    templates.write_text("a photo of a {}.\n")
    return classes, templates


# ---- measuring ------------------------------------------------------------------------------------


def analytic_vit_flops(visual, num_classes: int, heads: int = 1) -> int:
    """2 x multiply-adds of an open_clip ViT's forward: patch embedding, blocks (QKV and output
    projections, attention scores and values, MLP), final projection, `heads` linear heads."""
    blocks = visual.transformer
    width, mlp = blocks.width, blocks.resblocks[0].mlp.c_fc.out_features
    patches = visual.grid_size[0] * visual.grid_size[1]
    tokens = patches + 1
    kernel = visual.conv1.weight
    per_block = 2 * tokens * (4 * width * width + 2 * width * mlp) + 2 * 2 * tokens * tokens * width
    embed = visual.proj.shape[1]
    return int(blocks.layers * per_block + 2 * patches * kernel[0].numel() * width + 2 * width * embed
               + heads * 2 * embed * num_classes)


def peak_rss_mb(children: bool = False) -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    return usage.ru_maxrss / 1024


class Timer:
    """Wall-clock seconds, and CPU seconds of this process (all its threads). On the shared 2-core
    machine other people's work stretches wall-clock time; a single-threaded benchmark's CPU time is
    its own work, which is what the side-by-side ratios compare."""

    def __enter__(self):
        self.started, self.cpu_started = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.started
        self.cpu_seconds = time.process_time() - self.cpu_started


def side_by_side(a: list, b: list, count: int, names: tuple[str, str]) -> dict:
    """Rates and the ratio rate(b) / rate(a) of two interleaved series of Timers over `count` items,
    from medians, by CPU time (the headline) and by wall-clock time."""
    import statistics

    out = {}
    for clock, attribute in (("cpu", "cpu_seconds"), ("wall", "seconds")):
        seconds = [[getattr(t, attribute) for t in series] for series in (a, b)]
        medians = [statistics.median(s) for s in seconds]
        out[clock] = {f"{names[0]}_per_second": count / medians[0], f"{names[1]}_per_second": count / medians[1],
                      "ratio": medians[0] / medians[1], f"{names[0]}_seconds": seconds[0],
                      f"{names[1]}_seconds": seconds[1]}
    return out
