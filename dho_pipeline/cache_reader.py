"""Reading the teacher cache: the counterpart of cache_store's writer, and the only code that reads it for training.

A `CacheReader` opens a cache for one manifest and one KD temperature and checks, once, everything a
reader relies on: the cache was built from this manifest (and, if asked, for this class list), every
shard is complete, and the temperature can be served, from a stored log-partition at T or, for a
full-logit cache, from all the logits. It knows which samples stage one recorded as missing, and
checks everything it reads before handing it out: each chunk against its checksum (a lost or damaged
chunk), each value against what a sound cache holds (cache_store.value_problem: finite, indices in
the class list, top-k probabilities consistent with the log-partitions), and each shard's keys
against the manifest; any fault is a one-line UserError naming the cache, shard and array. It hands
out `CachedViews` (all of a sample's views, numpy), from which one view per sample becomes `TeacherTargets`.

`TeacherTargets` is what a KD loss takes, whichever teacher produced it: the cache (top-k logits plus
the exact log-partition at T) or a teacher run online (`TeacherTargets.from_logits`: every logit, so
k = C and the loss is the plain full KL).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from .cache_store import CacheDamage, TeacherCache, value_problem
from .errors import UserError
from .manifest import Manifest

_VIEW_ARRAYS = ("key", "box", "flip", "topk_index", "topk_logit", "log_partition")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherTargets:
    """The teacher's answer for one view per sample, at the training temperature: the KD loss's input.

    `topk_index`/`topk_logit` are the teacher's k best classes and their logits (k = C: every class);
    `log_partition` is logsumexp(all C logits / T), so top-k probabilities and the mass outside them
    are exact. `keys`, `boxes` (uint16 fractions, as cached) and `flips` say which view of which sample.
    """

    keys: tuple[str, ...]
    boxes: torch.Tensor  # int32 [B, 4]
    flips: torch.Tensor  # bool [B]
    topk_index: torch.Tensor  # int64 [B, K]
    topk_logit: torch.Tensor  # float32 [B, K]
    log_partition: torch.Tensor  # float32 [B]

    @classmethod
    def from_logits(cls, logits: torch.Tensor, temperature: float, *, keys, boxes, flips) -> "TeacherTargets":
        """Targets from a teacher's full logits [B, C] (a teacher run online)."""
        logits = logits.float()
        index = torch.arange(logits.shape[-1], device=logits.device).expand_as(logits)
        return cls(tuple(keys), boxes, flips, index, logits, torch.logsumexp(logits / temperature, dim=-1))

    def to(self, device, non_blocking: bool = False) -> "TeacherTargets":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=non_blocking)
        return TeacherTargets(**moved)

    def pin_memory(self) -> "TeacherTargets":  # called by a DataLoader with pin_memory=True
        return TeacherTargets(**{
            f.name: getattr(self, f.name).pin_memory() if isinstance(getattr(self, f.name), torch.Tensor)
            else getattr(self, f.name) for f in fields(self)
        })


@dataclass(frozen=True)
class CachedViews:
    """Every cached view of some samples, with the log-partition already at the reader's temperature."""

    keys: np.ndarray  # str [n]
    boxes: np.ndarray  # uint16 [n, V, 4]
    flips: np.ndarray  # bool [n, V]
    topk_index: np.ndarray  # int16/int32 [n, V, K]
    topk_logit: np.ndarray  # float16 [n, V, K]
    log_partition: np.ndarray  # float32 [n, V]

    def take(self, rows) -> "CachedViews":
        return CachedViews(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    @staticmethod
    def concatenate(parts: list["CachedViews"]) -> "CachedViews":
        return CachedViews(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(CachedViews)})

    def pick(self, views: np.ndarray) -> TeacherTargets:
        """Targets for view `views[i]` of sample i."""
        pick = np.arange(len(views)), views
        return TeacherTargets(
            keys=tuple(str(k) for k in self.keys),
            boxes=torch.from_numpy(self.boxes[pick].astype(np.int32)),
            flips=torch.from_numpy(self.flips[pick]),
            topk_index=torch.from_numpy(self.topk_index[pick].astype(np.int64)),
            topk_logit=torch.from_numpy(self.topk_logit[pick].astype(np.float32)),
            log_partition=torch.from_numpy(self.log_partition[pick].astype(np.float32)),
        )


class CacheReader:
    """A complete teacher cache, opened for one manifest and one temperature. Construct with `open`."""

    def __init__(self, cache: TeacherCache, manifest: Manifest, temperature: float, column: int | None):
        self.cache, self.manifest, self.temperature = cache, manifest, float(temperature)
        self._column = column  # index of T among the stored log-partitions; None: compute from all logits

    @classmethod
    def open(cls, path: str | Path, manifest: Manifest, temperature: float | None, *,
             classnames: list[str] | None = None, classnames_source: str | None = None) -> "CacheReader":
        """Open and check a cache; every refusal is a one-line UserError naming the cache.

        `temperature` None: the caller reads views but no teacher probabilities (any stored T serves).
        """
        cache = TeacherCache.open(path)
        if temperature is None:
            temperature = cache.spec.temperatures[0]
        if cache.spec.manifest_fingerprint != manifest.fingerprint:
            raise UserError(f"cache {path} was built from another manifest than the one given; use its own manifest")
        incomplete = cache.incomplete_shards()
        if incomplete:
            names = ", ".join(cache.spec.shards[i]["name"] for i in incomplete[:3])
            raise UserError(
                f"cache {path} is missing {len(incomplete)} shard(s) ({names}{' ...' if len(incomplete) > 3 else ''}); "
                "rerun cache-teacher to finish it"
            )
        if classnames is not None and list(classnames) != cache.spec.classnames:
            raise UserError(
                f"cache {path} was built for another class list than {classnames_source or 'the one given'}; "
                "use a cache built with these class names"
            )
        _check_shard_records(cache, manifest)
        return cls(cache, manifest, temperature, _temperature_column(cache, temperature))

    @property
    def path(self) -> Path:
        return self.cache.path

    @property
    def spec(self):
        return self.cache.spec

    @property
    def num_views(self) -> int:
        return self.cache.spec.num_views

    def missing_masks(self) -> list[np.ndarray]:
        """Per manifest shard, True where stage one recorded the sample as missing (--on-error skip)."""
        masks = []
        for index, shard in enumerate(self.manifest.shards):
            missing = {m["key"] for m in (self.cache.shard_attrs(index) or {}).get("missing", [])}
            masks.append(np.array([key in missing for key in shard.keys], dtype=bool))
        return masks

    def read(self, shard: int, positions: np.ndarray | None = None) -> CachedViews:
        """Cached views of a shard's samples (all of them, or those at `positions`), checked: checksums
        of the chunks read, values of the rows read, keys."""
        arrays = self.cache.read_shard(shard, _VIEW_ARRAYS, positions)
        # Which rows stage one recorded as missing (no teacher output to check): from the completion
        # marker, which is written with the checksums, so one zarr read less per shard.
        missing = {m["key"] for m in (self.cache.shard_attrs(shard) or {}).get("missing", [])}
        arrays["missing"] = np.array([str(key) in missing for key in arrays["key"]], dtype=bool) if missing \
            else np.zeros(len(arrays["key"]), dtype=bool)
        # Log-partitions: the column this reader serves (none for a full-logit cache computing its own).
        problem = value_problem(self.spec, arrays, columns=[] if self._column is None else [self._column])
        if problem:
            raise CacheDamage(f"cache {self.path}, shard {self.manifest.shards[shard].name}, {problem}")
        expected = self.manifest.shards[shard].keys
        if positions is not None:
            expected = [expected[p] for p in positions]
        if list(arrays["key"]) != list(expected):
            raise UserError(
                f"cache {self.path}: shard {self.manifest.shards[shard].name} keys differ from the manifest; "
                "rebuild the cache for this manifest"
            )
        return CachedViews(
            keys=arrays["key"], boxes=arrays["box"], flips=arrays["flip"], topk_index=arrays["topk_index"],
            topk_logit=arrays["topk_logit"], log_partition=self._log_partition(arrays),
        )

    def _log_partition(self, arrays: dict) -> np.ndarray:
        if self._column is not None:
            return arrays["log_partition"][..., self._column]
        # A full-logit cache without this T: every logit is there, so the log-partition is exact here.
        scaled = arrays["topk_logit"].astype(np.float64) / self.temperature
        top = scaled.max(axis=-1, keepdims=True)
        return (top[..., 0] + np.log(np.exp(scaled - top).sum(axis=-1))).astype(np.float32)


def _check_shard_records(cache: TeacherCache, manifest: Manifest) -> None:
    """Each shard's rows were computed from the manifest's shard file (the sha256 stage one hashed
    while reading it); caches written before checksums were recorded are read, with a warning."""
    for index, shard in enumerate(manifest.shards):
        problem = cache.source_problem(index, shard.fingerprint)
        if problem:
            raise CacheDamage(problem)
    note = cache.unchecked_note()
    if note:
        log.warning("warning: %s", note)


def _temperature_column(cache: TeacherCache, temperature: float) -> int | None:
    """Index of T in the cache's log-partitions; None for a full-logit cache without that T."""
    temperatures = [float(t) for t in cache.spec.temperatures]
    if float(temperature) in temperatures:
        return temperatures.index(float(temperature))
    if cache.spec.full_logits:
        return None
    held = ", ".join(f"{t:g}" for t in temperatures)
    raise UserError(
        f"cache {cache.path} holds top-{cache.spec.topk} logits with exact log-partitions at T = {held} only; "
        f"train at one of those, or rebuild the cache with --temperatures including {temperature:g} (or --topk all)"
    )
