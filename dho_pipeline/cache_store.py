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

A shard group's attribute `complete: true` is written last, after every array is whole, in the same
zarr.json as the shard's checksums (a BLAKE2b digest of each chunk's decoded rows, per array) and the
sha256 of the shard file its rows were computed from; a group without it is ignored by readers and
rewritten by the next run. `read_shard` checks every chunk it reads against its digest (a chunk file
that is lost reads back as the fill value, so only a digest notices) and `shard_problem` checks the
values a sound cache holds; both name the cache, shard and array. Each shard group is written by exactly
one process, so no two processes ever write the same chunk or object; the root attributes are written
by rank 0 alone (at creation, and the run summary at the end).
"""

from __future__ import annotations

import hashlib
import json
import shutil
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


# The teacher's class embeddings: the mean of the per-template unit text embeddings renormalised to unit
# length ("unit", open_clip's zero-shot classifier), or left as it is ("reference", the DHO reference's DFN5B path).
CLASS_EMBEDDINGS = ("unit", "reference")
_LOGITS = {  # what the cached logits are, per class-embedding setting
    "unit": "logit_scale * cos(image_embedding, template-averaged class embedding)",
    "reference": "logit_scale * normalized(image_embedding) . mean of the unit per-template class embeddings "
                 "(not renormalised)",
}


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
    class_embeddings: str = "unit"  # CLASS_EMBEDDINGS: renormalised ("unit") or the reference's mean

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
            "logits": _LOGITS.get(self.class_embeddings, "unknown"),
        }

    @classmethod
    def from_attrs(cls, attrs: dict) -> "CacheSpec":
        # Caches written before `class_embeddings` existed were built with unit class embeddings (its default).
        return cls(**{name: attrs[name] for name in cls.__dataclass_fields__ if name in attrs or name != "class_embeddings"})

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
    source_fingerprint: str | None = None  # sha256 of the shard file, hashed while its rows were computed

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


CHECKSUM_ALGORITHM = "blake2b-128 of each chunk's decoded rows"


def chunk_digest(rows: np.ndarray) -> str:
    """BLAKE2b-128 of decoded rows: numbers as little-endian C-order bytes, strings as a JSON list.

    Digests of decoded values, not of stored bytes, so they hold whatever the codecs; a chunk file
    that is lost reads back as the fill value and fails its digest (unless it held only fill values,
    which zarr does not store in the first place)."""
    if rows.dtype.kind in "OUT":
        data = json.dumps([str(value) for value in rows], ensure_ascii=False).encode("utf-8")
    else:
        data = np.ascontiguousarray(rows, dtype=rows.dtype.newbyteorder("<")).view(np.uint8).data
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def chunk_digests(values: np.ndarray, chunk_rows: int) -> list[str]:
    return [chunk_digest(values[start:start + chunk_rows]) for start in range(0, len(values), chunk_rows)]


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
        chunk_rows = min(CHUNK_ROWS, max(1, len(data.keys)))
        digests = {}
        for array_name, values in data.arrays().items():
            chunks = (chunk_rows,) + values.shape[1:]
            if values.dtype.kind == "U":  # variable-length UTF-8 keys
                array = group.create_array(array_name, shape=values.shape, dtype=str, chunks=chunks)
            else:
                array = group.create_array(array_name, shape=values.shape, dtype=values.dtype, chunks=chunks,
                                           compressors=compressors(self.compression))
            array[...] = values
            digests[array_name] = chunk_digests(values, chunk_rows)  # of what was meant to be stored
        missing = [{"key": key, "reason": data.missing_reasons.get(key, "")} for key in np.array(data.keys)[data.missing]]
        # One zarr.json write (atomic): the marker never lands without its checksums.
        group.attrs.update({
            "complete": True, "num_missing": len(missing), "missing": missing,
            "source": {"sha256": data.source_fingerprint},
            "checksums": {"algorithm": CHECKSUM_ALGORITHM, "chunk_rows": chunk_rows, "arrays": digests},
        })

    def read_shard(self, index: int, arrays: tuple[str, ...] = ARRAYS, positions=None) -> dict[str, np.ndarray]:
        """A complete shard's arrays as numpy: every row, or only the rows at `positions`.

        Every chunk read is checked against its recorded digest (shards written before digests were
        recorded are read unchecked); a lost, damaged or undecodable chunk is a UserError naming the
        cache, shard, array and chunk."""
        attrs = self.shard_attrs(index)
        if not (attrs and attrs.get("complete")):
            raise UserError(f"cache {self.path}: shard {self.spec.shards[index]['name']} is not complete")
        zarr = _zarr()
        group = zarr.open_group(store=str(self.path), path=self.shard_group_name(index), mode="r")
        checksums = attrs.get("checksums")
        result = {}
        for name in arrays:
            array = group[name]
            rows = checksums["chunk_rows"] if checksums else array.chunks[0]
            if positions is None:  # one read of every row (cheaper than chunk by chunk), checked chunk by chunk
                values = self._read_rows(index, array, name, 0, array.shape[0], rows)
                for start in range(0, array.shape[0], rows):
                    self._check_chunk(index, array, name, start // rows, values[start:start + rows], checksums)
                result[name] = values
                continue
            # Only the chunks holding `positions`, each read and checked whole; then the rows asked for.
            parts, offsets = [], {}
            for chunk in np.unique(np.asarray(positions, dtype=np.int64) // rows).tolist():
                part = self._read_rows(index, array, name, chunk * rows, min((chunk + 1) * rows, array.shape[0]), rows)
                self._check_chunk(index, array, name, chunk, part, checksums)
                offsets[chunk] = sum(len(p) for p in parts)
                parts.append(part)
            if not parts:
                result[name] = array[0:0]
                continue
            values = np.concatenate(parts) if len(parts) > 1 else parts[0]
            result[name] = values[[offsets[int(p) // rows] + int(p) % rows for p in positions]]
        return result

    def _where(self, index: int, name: str) -> str:
        return f"cache {self.path}, shard {self.spec.shards[index]['name']}, array {name}"

    def _read_rows(self, index: int, array, name: str, start: int, stop: int, rows: int) -> np.ndarray:
        """Rows [start, stop) of an array; a chunk that cannot be decoded is named (found chunk by chunk)."""
        try:
            return array[start:stop]
        except Exception:  # a damaged chunk surfaces as a codec or IO error
            pass
        for chunk_start in range(start, stop, rows):
            chunk_stop = min(chunk_start + rows, stop)
            try:
                array[chunk_start:chunk_stop]
            except Exception as error:
                text = str(error).splitlines()[0] if str(error) else ""
                raise CacheDamage(f"{self._where(index, name)}: chunk {chunk_start // rows} (rows {chunk_start}-"
                                  f"{chunk_stop - 1}) cannot be decoded ({type(error).__name__}: {text})") from None
        return array[start:stop]  # a passing fault: read again

    def _check_chunk(self, index: int, array, name: str, chunk: int, values: np.ndarray, checksums: dict | None):
        """A chunk's decoded rows against the digest recorded when it was written (none: nothing to check)."""
        if checksums is None:
            return
        expected = checksums["arrays"].get(name, [])
        if chunk < len(expected) and chunk_digest(values) == expected[chunk]:
            return
        start = chunk * checksums["chunk_rows"]
        chunk_file = self.path / self.shard_group_name(index) / name / \
            array.metadata.chunk_key_encoding.encode_chunk_key((chunk,) + (0,) * (array.ndim - 1))
        what = f"is missing ({chunk_file.relative_to(self.path)} is gone)" if not chunk_file.exists() \
            else "does not match its checksum"
        raise CacheDamage(f"{self._where(index, name)}: chunk {chunk} (rows {start}-{start + len(values) - 1}) {what}")

    def shard_problem(self, index: int, keys: list[str] | None = None, source: str | None = None) -> str | None:
        """What is wrong with a complete shard, in one line naming the cache, shard and array, or None:
        every chunk against its digest, then every value (see `value_problem`), then its keys (if given)
        and the sha256 of the shard file it was computed from (if given, and recorded)."""
        try:
            arrays = self.read_shard(index)
        except CacheDamage as error:
            return error.detail
        where = f"cache {self.path}, shard {self.spec.shards[index]['name']}"
        n, v, k = len(arrays["key"]), self.spec.num_views, self.spec.topk
        expected = {"key": (n,), "missing": (n,), "box": (n, v, 4), "flip": (n, v), "topk_index": (n, v, k),
                    "topk_logit": (n, v, k), "log_partition": (n, v, len(self.spec.temperatures))}
        for name, shape in expected.items():
            if arrays[name].shape != shape:
                return f"{where}, array {name}: shape {arrays[name].shape}, expected {shape}"
        problem = value_problem(self.spec, arrays)
        if problem:
            return f"{where}, {problem}"
        if keys is not None and list(arrays["key"]) != list(keys):
            first = next(i for i, (a, b) in enumerate(zip(arrays["key"], keys)) if a != b)
            return f"{where}: keys differ from the manifest at #{first} ({arrays['key'][first]!r} vs {keys[first]!r})"
        return self.source_problem(index, source) if source is not None else None

    def source_problem(self, index: int, sha256: str) -> str | None:
        """If the shard's rows were computed from another shard file than the one with this sha256 (as
        stage one recorded it, hashing the file whole as it read it): what to say, naming the shard."""
        recorded = (self.shard_attrs(index) or {}).get("source", {}).get("sha256")
        if recorded is not None and recorded != sha256:
            return (f"cache {self.path}, shard {self.spec.shards[index]['name']}: computed from another shard file "
                    f"({recorded[:19]}...) than the manifest's")
        return None

    def has_checksums(self, index: int) -> bool:
        return "checksums" in (self.shard_attrs(index) or {})

    def unchecked_note(self, shards: list[int] | None = None) -> str | None:
        """How many of `shards` (default: all) were written before checksums were recorded, and what that
        means; None when every one carries them."""
        shards = range(len(self.spec.shards)) if shards is None else shards
        unchecked = sum(not self.has_checksums(i) for i in shards)
        if not unchecked:
            return None
        return (f"{unchecked} of {len(shards)} shards were written before checksums were recorded (cache "
                f"{self.path}): their values are checked, but a lost chunk of flips or logits can pass unseen "
                "(rebuild the cache, cache-teacher into a new --out, to add them)")

    def incomplete_shards(self) -> list[int]:
        return [i for i in range(len(self.spec.shards)) if not self.is_complete(i)]

    # ---- run summary -------------------------------------------------------------------------------

    def write_summary(self, summary: dict) -> None:
        """Record the outcome of the last run in the root attributes. Rank 0 only."""
        zarr = _zarr()
        root = zarr.open_group(store=str(self.path), mode="r+")
        root.attrs.update({"status": summary})


REPAIR = "rerun the cache-teacher command that built the cache: it recomputes only damaged shards"


class CacheDamage(UserError):
    """Rows of a complete shard that are lost, damaged or impossible; `detail` names the cache, shard
    and array, the message adds what to do."""

    def __init__(self, detail: str):
        self.detail = detail
        super().__init__(f"{detail}; {REPAIR}")


def value_problem(spec: CacheSpec, arrays: dict[str, np.ndarray], columns: list[int] | None = None) -> str | None:
    """The first value a sound cache cannot hold, as "array NAME: what, at key K view v", or None.

    Checks the rows of samples not recorded as missing: finite logits and log-partitions, class
    indices inside the class list and distinct within a view, logits in descending order, boxes that
    are not empty, and top-k probabilities exp(z / T - logZ_T) that sum to at most 1 (up to float16
    rounding of z), which also bounds logZ_T from below by max z / T, at the log-partition `columns`
    given (default: every stored T). About 10 ms per 10,000 top-100 views and temperature checked."""
    present = ~np.asarray(arrays["missing"], bool)
    rows = slice(None) if present.all() else present  # a copy only where samples are missing
    keys = np.asarray(arrays["key"])[rows]

    def at(mask: np.ndarray) -> str:
        row, view = np.argwhere(mask)[0][:2]
        return f"at key {str(keys[row])!r} view {view}"

    logits = arrays["topk_logit"][rows].astype(np.float32)
    indices = arrays["topk_index"][rows]
    log_partition = arrays["log_partition"][rows]
    boxes = arrays["box"][rows].astype(np.int64)
    if not np.isfinite(logits).all():
        return f"array topk_logit: a non-finite logit {at(~np.isfinite(logits))}"
    if not np.isfinite(log_partition).all():
        return f"array log_partition: a non-finite value {at(~np.isfinite(log_partition))}"
    outside = (indices < 0) | (indices >= spec.num_classes)
    if outside.any():
        return (f"array topk_index: class index {int(indices[outside][0])} outside the class list "
                f"(0..{spec.num_classes - 1}) {at(outside)}")
    if indices.shape[-1] > 1:
        ordered = np.sort(indices, axis=-1)
        repeated = (ordered[..., 1:] == ordered[..., :-1]).any(-1)
        if repeated.any():
            return f"array topk_index: a class listed twice in one view's top-k {at(repeated)}"
    unordered = (np.diff(logits, axis=-1) > 0).any(-1)
    if unordered.any():
        return f"array topk_logit: top-k logits not in descending order {at(unordered)}"
    empty = (boxes[..., 2] <= boxes[..., 0]) | (boxes[..., 3] <= boxes[..., 1])
    if empty.any():
        return f"array box: an empty or inverted box {at(empty)}"
    if logits.size == 0:
        return None
    # float16 keeps 11 significant bits: each z / T may be off by |z| / T * 2^-11; allow twice that.
    # The logits are in descending order, so the largest |z| is at one end.
    largest = np.maximum(np.abs(logits[..., 0]), np.abs(logits[..., -1]))
    for column in range(len(spec.temperatures)) if columns is None else columns:
        temperature = spec.temperatures[column]
        scaled = logits / np.float32(temperature)
        slack = largest / np.float32(temperature) * 2.0**-10 + 1e-4
        with np.errstate(over="ignore"):  # a far too small log-partition overflows to inf: still caught
            excess = np.log(np.exp(scaled - log_partition[..., column:column + 1]).sum(axis=-1)) > slack
        if excess.any():
            return (f"array log_partition: top-k probabilities at T = {temperature:g} sum past 1 "
                    f"(the log-partition is too small for the logits) {at(excess)}")
    return None


@contextmanager
def exclusive_writer(cache_path: str | Path) -> Iterator[None]:
    """Hold `<cache>.lock` for the duration; a second writer gets a clear refusal, not a race.

    The kernel drops the lock when the process dies, and a data worker never holds it
    (processes.exclusive_lock), so a killed run never leaves a stale lock. A start that fails before
    creating the cache (a teacher that cannot load, ...) removes the lock file, so it leaves nothing.
    """
    from .processes import exclusive_lock

    lock_path = Path(str(cache_path).rstrip("/") + ".lock")
    with exclusive_lock(lock_path, lambda holder: f"cache {cache_path} is being written by {holder}; wait for it "
                        "to finish (or stop it), then rerun to resume",
                        remove_after=lambda: not Path(cache_path).exists()):
        yield
