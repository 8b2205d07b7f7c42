"""The teacher cache: a Zarr v3 store of per-view teacher summaries, one group per dataset shard.

Layout (readable with zarr alone; see docs/cache-format.md):

    CACHE.zarr/zarr.json                 root group; its attributes are the cache's spec
    CACHE.zarr/shards/NNNNNN/            one group per manifest shard (NNNNNN = its manifest index)
        key            [N]        string   sample keys, in manifest order
        missing        [N]        bool     the image could not be decoded (--on-error skip)
        box            [N, V, 4]  uint16   x0, y0, x1, y1 as fractions of width/height, times 65535
        flip           [N, V]     bool     mirror the rendered crop
        topk_index     [N, V, K]  int16    class indices, by descending logit (int32 past 32767 classes)
        topk_logit     [N, V, K]  float16  teacher logits 100 * cos(image, class)
        log_partition  [N, V, T]  float32  logsumexp(logits / T) over *all* classes, per temperature

A shard group's attribute `complete: true` is written last, after every array is whole; a group
without it is ignored by readers and rewritten by the next run. Each shard group is written by exactly
one process, so no two processes ever write the same chunk or object; the root attributes are written
by rank 0 alone (at creation, and the run summary at the end).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import UserError
from .hashing import fingerprint_json
from .views import BOX_SCALE

FORMAT = "dho-pipeline-teacher-cache"
SCHEMA_VERSION = 1
CHUNK_ROWS = 256  # samples per chunk: small enough for cheap random reads of labeled samples
ARRAYS = ("key", "missing", "box", "flip", "topk_index", "topk_logit", "log_partition")
COMPRESSIONS = ("none", "zstd", "blosc-zstd", "blosc-lz4")
DEFAULT_COMPRESSION = "blosc-zstd"  # smallest in bench/cache_size.py (BENCHMARKS.md)


def compressors(name: str):
    """Zarr codecs for a compression choice (bench/cache_size.py measures them)."""
    from zarr.codecs import BloscCodec, BloscShuffle, ZstdCodec

    if name == "none":
        return None
    if name == "zstd":
        return ZstdCodec(level=3)
    if name in ("blosc-zstd", "blosc-lz4"):
        # Byte shuffle puts the high bytes of neighbouring int16/float16 values together: sorted
        # top-k logits and class indices share them, so they compress well.
        return BloscCodec(cname=name.split("-")[1], clevel=5, shuffle=BloscShuffle.shuffle)
    raise UserError(f"unknown compression {name!r}; choose one of {', '.join(COMPRESSIONS)}")


@dataclass(frozen=True, kw_only=True)
class CacheSpec:
    """What a cache was built with. Two runs may share a cache only if their specs are equal."""

    teacher: dict  # {"model", "pretrained", "weights_fingerprint"}
    classnames: list[str]
    templates: list[str]
    preprocess: dict  # clip_models.Preprocess.to_json()
    views: dict  # views.ViewPolicy.to_json()
    topk: int  # logits kept per view; equal to the number of classes for a full-logit cache
    temperatures: list[float]
    logit_scale: float
    manifest_fingerprint: str
    shards: list[dict]  # [{"name", "num_samples"}], manifest order

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def full_logits(self) -> bool:
        return self.topk == self.num_classes

    @property
    def num_views(self) -> int:
        return self.views["num_views"]

    def to_attrs(self) -> dict:
        spec = json.loads(json.dumps(asdict(self)))  # tuples to lists, as they come back from JSON
        return {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            **spec,
            "classnames_fingerprint": fingerprint_json(self.classnames),
            "templates_fingerprint": fingerprint_json(self.templates),
            "full_logits": self.full_logits,
            "box_scale": BOX_SCALE,
            "logits": "logit_scale * cos(image_embedding, template-averaged class embedding)",
        }

    @classmethod
    def from_attrs(cls, attrs: dict) -> "CacheSpec":
        return cls(**{name: attrs[name] for name in cls.__dataclass_fields__})

    def differences(self, other: "CacheSpec") -> list[str]:
        mine, theirs = self.to_attrs(), other.to_attrs()
        return [name for name in self.__dataclass_fields__ if mine[name] != theirs[name]]


@dataclass
class ShardData:
    """One shard's cached views, all rows in manifest order."""

    keys: list[str]
    missing: np.ndarray  # bool [N]
    boxes: np.ndarray  # uint16 [N, V, 4]
    flips: np.ndarray  # bool [N, V]
    topk_index: np.ndarray  # int16/int32 [N, V, K]
    topk_logit: np.ndarray  # float16 [N, V, K]
    log_partition: np.ndarray  # float32 [N, V, T]
    missing_reasons: dict[str, str] = field(default_factory=dict)  # key -> why

    @classmethod
    def empty(cls, keys: list[str], num_views: int, k: int, num_temperatures: int, index_dtype) -> "ShardData":
        n = len(keys)
        return cls(
            keys=list(keys),
            missing=np.zeros(n, dtype=bool),
            boxes=np.zeros((n, num_views, 4), dtype=np.uint16),
            flips=np.zeros((n, num_views), dtype=bool),
            topk_index=np.zeros((n, num_views, k), dtype=index_dtype),
            topk_logit=np.zeros((n, num_views, k), dtype=np.float16),
            log_partition=np.zeros((n, num_views, num_temperatures), dtype=np.float32),
        )

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "key": np.array(self.keys, dtype=str),
            "missing": self.missing,
            "box": self.boxes,
            "flip": self.flips,
            "topk_index": self.topk_index,
            "topk_logit": self.topk_logit,
            "log_partition": self.log_partition,
        }


def index_dtype(num_classes: int):
    return np.int16 if num_classes <= np.iinfo(np.int16).max + 1 else np.int32


def _zarr():
    import zarr

    return zarr


class TeacherCache:
    """A teacher cache on local disk. Construct with `create_or_resume` (writer) or `open` (reader)."""

    def __init__(self, path: Path, spec: CacheSpec, compression: str = DEFAULT_COMPRESSION):
        self.path = Path(path)
        self.spec = spec
        self.compression = compression  # for shards this object writes; each array records its own codecs

    # ---- creation and opening -------------------------------------------------------------------

    @classmethod
    def create_or_resume(cls, path: str | Path, spec: CacheSpec) -> "TeacherCache":
        """Create a new cache, or reopen one built with the same spec (to resume it). Rank 0 only."""
        path = Path(path)
        if (path / "zarr.json").exists():
            existing = cls.open(path)
            changed = spec.differences(existing.spec)
            if changed:
                raise UserError(
                    f"cache {path} was built with a different {', '.join(changed)}; "
                    "use another --out, or delete the cache to rebuild it"
                )
            return existing
        if path.is_dir():  # a creation killed before its root zarr.json landed leaves only temp files
            for leftover in path.glob("*.partial"):
                leftover.unlink()
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UserError(f"{path} exists and is not a teacher cache; choose another --out")
        zarr = _zarr()
        root = zarr.create_group(store=str(path), attributes=spec.to_attrs())
        root.create_group("shards")
        return cls(path, spec)

    @classmethod
    def open(cls, path: str | Path) -> "TeacherCache":
        path = Path(path)
        if not (path / "zarr.json").exists():
            raise UserError(f"{path} is not a teacher cache (no zarr.json); build one with `dho-pipeline cache-teacher`")
        try:
            attrs = json.loads((path / "zarr.json").read_text(encoding="utf-8"))["attributes"]
        except (OSError, ValueError, KeyError) as error:
            raise UserError(f"cache {path}: unreadable root metadata ({error})") from None
        if attrs.get("format") != FORMAT:
            raise UserError(f"{path} is a Zarr store but not a dho-pipeline teacher cache")
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise UserError(
                f"cache {path} has schema version {attrs.get('schema_version')}; this tool reads {SCHEMA_VERSION}"
            )
        try:
            spec = CacheSpec.from_attrs(attrs)
        except KeyError as error:
            raise UserError(f"cache {path}: root metadata lacks {error}") from None
        return cls(path, spec)

    @property
    def attrs(self) -> dict:
        return json.loads((self.path / "zarr.json").read_text(encoding="utf-8"))["attributes"]

    # ---- shards ------------------------------------------------------------------------------------

    def shard_group_name(self, index: int) -> str:
        return f"shards/{index:06d}"

    def shard_attrs(self, index: int) -> dict | None:
        """The attributes of a shard group, or None if the group does not exist (yet)."""
        meta = self.path / self.shard_group_name(index) / "zarr.json"
        try:
            return json.loads(meta.read_text(encoding="utf-8")).get("attributes", {})
        except FileNotFoundError:
            return None

    def is_complete(self, index: int) -> bool:
        attrs = self.shard_attrs(index)
        return bool(attrs and attrs.get("complete"))

    def write_shard(self, index: int, data: ShardData) -> None:
        """Write one shard's group whole, then mark it complete (the marker is written last)."""
        zarr = _zarr()
        name = self.shard_group_name(index)
        shutil.rmtree(self.path / name, ignore_errors=True)  # leftovers of an interrupted run
        entry = self.spec.shards[index]
        group = zarr.create_group(
            store=str(self.path),
            path=name,
            attributes={"name": entry["name"], "num_samples": entry["num_samples"], "complete": False},
        )
        for array_name, values in data.arrays().items():
            chunks = (min(CHUNK_ROWS, max(1, values.shape[0])),) + values.shape[1:]
            if values.dtype.kind == "U":  # variable-length UTF-8 keys
                array = group.create_array(array_name, shape=values.shape, dtype=str, chunks=chunks)
            else:
                array = group.create_array(array_name, shape=values.shape, dtype=values.dtype, chunks=chunks,
                                           compressors=compressors(self.compression))
            array[...] = values
        missing = [{"key": key, "reason": data.missing_reasons.get(key, "")} for key in np.array(data.keys)[data.missing]]
        group.attrs.update({"complete": True, "num_missing": len(missing), "missing": missing})

    def read_shard(self, index: int, arrays: tuple[str, ...] = ARRAYS, positions=None) -> dict[str, np.ndarray]:
        """A complete shard's arrays as numpy: every row, or only the rows at `positions`."""
        if not self.is_complete(index):
            raise UserError(f"cache {self.path}: shard {self.spec.shards[index]['name']} is not complete")
        zarr = _zarr()
        group = zarr.open_group(store=str(self.path), path=self.shard_group_name(index), mode="r")
        if positions is None:
            return {name: group[name][...] for name in arrays}
        return {name: group[name].oindex[np.asarray(positions)] for name in arrays}

    def incomplete_shards(self) -> list[int]:
        return [i for i in range(len(self.spec.shards)) if not self.is_complete(i)]

    # ---- run summary -------------------------------------------------------------------------------

    def write_summary(self, summary: dict) -> None:
        """Record the outcome of the last run in the root attributes. Rank 0 only."""
        zarr = _zarr()
        root = zarr.open_group(store=str(self.path), mode="r+")
        root.attrs.update({"status": summary})


def _lock_holder(handle) -> str:
    """Who holds the lock, as its holder wrote it; it writes just after locking, so allow it a moment."""
    for _ in range(20):
        handle.seek(0)
        holder = handle.read().strip()
        if holder:
            return holder
        time.sleep(0.05)
    return "another process"


@contextmanager
def exclusive_writer(cache_path: str | Path) -> Iterator[None]:
    """Hold `<cache>.lock` for the duration; a second writer gets a clear refusal, not a race.

    The kernel drops the lock when the process dies, so a killed run never leaves a stale lock. A start
    that fails before creating the cache (a teacher that cannot load, ...) removes the lock file while
    still holding it, so it leaves nothing behind; a taker that opened that file just before checks, once
    it holds the lock, that the file is still the one at the path, and else starts over.
    """
    lock_path = Path(str(cache_path).rstrip("/") + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(lock_path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(handle)
            handle.close()
            raise UserError(
                f"cache {cache_path} is being written by {holder}; wait for it to finish (or stop it), then rerun to resume"
            ) from None
        if _same_file(handle, lock_path):
            break
        handle.close()  # removed by its last holder after we opened it: take the new one
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {os.uname().nodename} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        yield
    finally:
        if not Path(cache_path).exists():  # nothing written: leave no lock file behind (still held here)
            lock_path.unlink(missing_ok=True)
        handle.close()


def _same_file(handle, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False
