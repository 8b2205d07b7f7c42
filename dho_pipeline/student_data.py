"""Stage two's input: student views of labeled, unlabeled and evaluation samples, joined to the cache.

Every sample is read straight from its shard at the byte offset the manifest recorded, so each stream
reads only its own samples (the labeled stream never scans unlabeled data), and any position in a
stream can be reached without reading what comes before it: resuming costs nothing.

Streams are infinite sequences of sample ids, cut into batches. Batch b of a stream is a pure function
of (seed, rank, world size, b), so every run, resumed or not, sees the same data in the same order:

- unlabeled: per stream epoch, the shards are shuffled and dealt to ranks (shard i of the shuffled
  list to rank i mod world); each rank visits its shards in groups of a few, shuffling the samples
  of a group together (a shard-level shuffle buffer with good file locality);
- labeled: per labeled epoch, the labeled samples are shuffled globally and dealt to ranks;
- evaluation: each sample exactly once, dealt to ranks in turn.

A DataLoader worker w of W produces batches b = first + w, first + w + W, ...; the DataLoader hands
them out round-robin, so the main process receives batches in stream order.

Shard files are checked as they are opened: the first time a reader opens a shard, its size and
sampled fingerprint against the manifest's (at most 64 KiB read); later openings only compare
(size, mtime, inode) with what that check saw. An image that does not decode sends the reader back
to the shard's full sha256, so a shard that changed since its manifest is named as the cause.

The view a sample shows at stream epoch e is view (e + h) mod V, h a per-sample hash: views are
covered evenly and differ between neighbours. With `crops_only` (the reference never trains on a
whole-image view) it is view 1 + (e + h) mod (V - 1): the random crops only, never view 0. Its pixels
are the original image cropped by the cached box, flipped as recorded, resized to the student's input (views.render_view), so teacher and
student always see the same view; with `via_size` (the reference's resampling) it is rendered at the
teacher's size first and resized from there. Evaluation shows the centred square, or with
`eval_view="reference"` the reference's evaluation chain (views.render_reference_eval).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .cache_reader import CacheReader, CachedViews
from .errors import UserError
from .manifest import Manifest, changed_message, file_change
from .views import (ViewPolicy, center_box, decode_rgb, describe_decode_error, draw_view, render_reference_eval,
                    render_view)

SHARDS_PER_GROUP = 4  # unlabeled shards whose samples are shuffled together


@dataclass
class SampleTable:
    """Every manifest sample as flat arrays, in manifest order (the global sample id is the index)."""

    shard: np.ndarray  # int32
    position: np.ndarray  # int32, within the shard
    label: np.ndarray  # int64, -1 where unknown
    offset: np.ndarray  # int64, byte offset of the image in its shard
    size: np.ndarray  # int64
    shard_paths: list[str]
    shard_names: list[str]
    keys: list[list[str]]  # per shard
    shard_records: list[dict]  # per shard: what file_change compares (size, sampled, sha256)
    manifest_path: str | None = None

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "SampleTable":
        shards = manifest.shards
        return cls(
            shard=np.concatenate([np.full(s.num_samples, i, np.int32) for i, s in enumerate(shards)]),
            position=np.concatenate([np.arange(s.num_samples, dtype=np.int32) for s in shards]),
            label=np.concatenate([
                np.array([-1 if v is None else v for v in (s.labels or [None] * s.num_samples)], np.int64)
                for s in shards
            ]),
            offset=np.concatenate([np.asarray(s.image_offsets, np.int64) for s in shards]),
            size=np.concatenate([np.asarray(s.image_sizes, np.int64) for s in shards]),
            shard_paths=[str(s.path) for s in shards],
            shard_names=[s.name for s in shards],
            keys=[s.keys for s in shards],
            shard_records=[{"size": s.size, "sampled": s.sampled_fingerprint, "sha256": s.fingerprint} for s in shards],
            manifest_path=str(manifest.source) if manifest.source else None,
        )

    def ids_of(self, masks: list[np.ndarray]) -> np.ndarray:
        """Global ids where a per-shard boolean mask is set."""
        return np.flatnonzero(np.concatenate(masks))

    def key(self, sample_id: int) -> str:
        return self.keys[self.shard[sample_id]][self.position[sample_id]]


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([w & 0xFFFFFFFF for w in words]))


def _view_offset(shard_name: str, key: str) -> int:
    digest = hashlib.blake2b(f"{shard_name}/{key}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


# ---- orders: which ids a rank sees in stream epoch e ---------------------------------------------


def unlabeled_order(table: SampleTable, ids: np.ndarray, seed: int, rank: int, world: int) -> Callable[[int], np.ndarray]:
    by_shard = {s: ids[table.shard[ids] == s] for s in np.unique(table.shard[ids])}
    shards = np.array(sorted(by_shard))

    def order(epoch: int) -> np.ndarray:
        rng = _rng(seed, 1, epoch)
        mine = rng.permutation(shards)[rank::world]
        groups = [mine[i : i + SHARDS_PER_GROUP] for i in range(0, len(mine), SHARDS_PER_GROUP)]
        parts = [rng.permutation(np.concatenate([by_shard[s] for s in group])) for group in groups]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    return order


def labeled_order(ids: np.ndarray, seed: int, rank: int, world: int) -> Callable[[int], np.ndarray]:
    def order(epoch: int) -> np.ndarray:
        return _rng(seed, 2, epoch).permutation(ids)[rank::world]

    return order


class IdStream:
    """An infinite stream of sample ids cut into batches; batch(b) -> (ids, stream epoch of each id)."""

    def __init__(self, order: Callable[[int], np.ndarray], batch_size: int):
        self.order = order
        self.batch_size = batch_size
        self._epoch_starts = [0]  # stream position where each epoch begins
        self._cached: tuple[int, np.ndarray] | None = None

    def _epoch_ids(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            ids = self.order(epoch)
            if len(ids) == 0:
                raise UserError("a training stream has no samples for this process; use fewer processes or more shards")
            self._cached = (epoch, ids)
        return self._cached[1]

    def _locate(self, position: int) -> tuple[int, int]:
        epoch = max(e for e, start in enumerate(self._epoch_starts) if start <= position)
        while True:
            length = len(self._epoch_ids(epoch))
            if len(self._epoch_starts) == epoch + 1:
                self._epoch_starts.append(self._epoch_starts[epoch] + length)
            if position < self._epoch_starts[epoch + 1]:
                return epoch, position - self._epoch_starts[epoch]
            epoch += 1

    def batch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        ids, epochs = [], []
        position = index * self.batch_size
        while len(ids) < self.batch_size:
            epoch, offset = self._locate(position)
            chunk = self._epoch_ids(epoch)[offset : offset + self.batch_size - len(ids)]
            ids.extend(chunk.tolist())
            epochs.extend([epoch] * len(chunk))
            position += len(chunk)
        return np.asarray(ids, np.int64), np.asarray(epochs, np.int64)


class FiniteIdStream:
    """Each id exactly once (evaluation): batch(b) for b < num_batches; the last batch may be short."""

    def __init__(self, ids: np.ndarray, batch_size: int, rank: int, world: int):
        self.ids = ids[rank::world]
        self.batch_size = batch_size
        self.num_batches = -(-len(self.ids) // batch_size)

    def batch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        ids = self.ids[index * self.batch_size : (index + 1) * self.batch_size]
        return ids, np.zeros(len(ids), np.int64)


# ---- cached teacher views, by sample id ----------------------------------------------------------


class ShardRows:
    """Cached views read a whole shard at a time, keeping the last few shards (the unlabeled stream)."""

    def __init__(self, reader: CacheReader, table: SampleTable, keep: int = SHARDS_PER_GROUP + 1):
        self.reader, self.table, self.keep = reader, table, keep
        self._shards: OrderedDict[int, CachedViews] = OrderedDict()

    def _shard(self, shard: int) -> CachedViews:
        if shard in self._shards:
            self._shards.move_to_end(shard)
            return self._shards[shard]
        views = self.reader.read(shard)
        self._shards[shard] = views
        while len(self._shards) > self.keep:
            self._shards.popitem(last=False)
        return views

    def get(self, ids: np.ndarray) -> CachedViews:
        shards, positions = self.table.shard[ids], self.table.position[ids]
        parts, rows = [], []
        for shard in dict.fromkeys(shards.tolist()):  # each shard read once per batch, in order of appearance
            inside = np.flatnonzero(shards == shard)
            parts.append(self._shard(shard).take(positions[inside]))
            rows.append(inside)
        return CachedViews.concatenate(parts).take(np.argsort(np.concatenate(rows)))


class PreloadedRows:
    """Cached views of a fixed, small set of samples (the labeled set), read once at start."""

    def __init__(self, reader: CacheReader, table: SampleTable, ids: np.ndarray):
        parts, order = [], []
        for shard in np.unique(table.shard[ids]):
            in_shard = ids[table.shard[ids] == shard]
            parts.append(reader.read(int(shard), table.position[in_shard]))
            order.extend(int(i) for i in in_shard)
        self.index = {sample_id: n for n, sample_id in enumerate(order)}
        self.views = CachedViews.concatenate(parts)

    def get(self, ids: np.ndarray) -> CachedViews:
        return self.views.take([self.index[int(i)] for i in ids])


# ---- the dataset -----------------------------------------------------------------------------------


class _ImageReader:
    """Reads image bytes by offset, keeping a few shard files open; checks each shard file as it opens it."""

    def __init__(self, table: SampleTable, keep: int = 8):
        self.table, self.keep = table, keep
        self._files: OrderedDict[int, object] = OrderedDict()
        self._checked: dict[int, tuple] = {}  # shard -> (size, mtime, inode) when it last passed the check

    def read(self, sample_id: int) -> bytes:
        shard = int(self.table.shard[sample_id])
        handle = self._files.get(shard)
        if handle is None:
            handle = self._open(shard)
            self._files[shard] = handle
            while len(self._files) > self.keep:
                self._files.popitem(last=False)[1].close()
        self._files.move_to_end(shard)
        handle.seek(int(self.table.offset[sample_id]))
        data = handle.read(int(self.table.size[sample_id]))
        if len(data) != self.table.size[sample_id]:
            raise self.changed(shard, "shorter than the manifest says")
        return data

    def _open(self, shard: int):
        try:
            handle = open(self.table.shard_paths[shard], "rb")
        except FileNotFoundError:
            raise self.changed(shard, "missing") from None
        except OSError as error:
            raise UserError(f"shard {self.table.shard_names[shard]} cannot be opened ({self.table.shard_paths[shard]}: "
                            f"{error.strerror or error}); fix that and rerun") from None
        status = os.fstat(handle.fileno())
        seen = (status.st_size, status.st_mtime_ns, status.st_ino)
        if self._checked.get(shard) != seen:
            problem = file_change(handle, **self.table.shard_records[shard])
            if problem:
                handle.close()
                raise self.changed(shard, problem)
            self._checked[shard] = seen
        return handle

    def changed(self, shard: int, problem: str) -> UserError:
        return UserError(changed_message(self.table.shard_names[shard], self.table.shard_paths[shard], problem,
                                         self.table.manifest_path))

    def undecodable(self, sample_id: int, error: Exception) -> UserError:
        """Why an image did not decode: its shard changed since the manifest (checked whole), or the image."""
        shard = int(self.table.shard[sample_id])
        try:
            with open(self.table.shard_paths[shard], "rb") as stream:
                problem = file_change(stream, **self.table.shard_records[shard], level="full")
        except OSError:
            problem = "missing"
        if problem:
            return self.changed(shard, problem)
        return UserError(f"shard {self.table.shard_names[shard]}, key {self.table.key(sample_id)!r}: "
                         f"cannot decode the image ({describe_decode_error(error)})")


class StudentBatches(IterableDataset):
    """Batches of student views (uint8 HWC) with labels and, when `rows` is given, teacher targets.

    With `rows` each sample shows a cached view; with `online_views`, a fresh view per stream epoch
    (for a teacher run online); with neither, the student's evaluation view: its centred square
    (`eval_crop` of the shorter side).
    `extra_sizes` renders the same views at more sizes (an online teacher's input) as "pixels_<h>".
    `via_size` renders the student's training views through that size (the reference's two resizes);
    `eval_view` "reference" renders the evaluation view as the reference does.
    """

    def __init__(self, table: SampleTable, stream, image_size: tuple[int, int], *, rows=None, num_views: int = 1,
                 first_batch: int = 0, num_batches: int | None = None, extra_sizes: tuple = (),
                 online_views: ViewPolicy | None = None, via_size: tuple[int, int] | None = None,
                 eval_view: str = "center-square", eval_crop: float = 1.0, crops_only: bool = False):
        self.table, self.stream, self.image_size, self.rows = table, stream, image_size, rows
        self.eval_crop = eval_crop
        self.num_views, self.first_batch, self.num_batches = num_views, first_batch, num_batches
        self.extra_sizes, self.online_views = extra_sizes, online_views
        self.via_size, self.eval_view, self.crops_only = via_size, eval_view, crops_only

    def __iter__(self):
        worker = get_worker_info()
        w, workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        reader = _ImageReader(self.table)
        index = self.first_batch + w
        while self.num_batches is None or index < self.first_batch + self.num_batches:
            try:
                batch = self._batch(reader, index)
            except UserError as error:
                if worker is None:
                    raise
                # A worker's exception reaches the caller wrapped in its traceback; this one line
                # is raised by the main process instead (StudentLoader), as with no workers.
                yield {"error": str(error)}
                return
            yield batch
            index += workers

    def _views(self, sample_ids, epochs, images):
        """(boxes [n, 4], flips [n]) of the view each sample shows, and its cached teacher targets (or None)."""
        n = len(sample_ids)
        if self.online_views is not None:  # view 1 + stream epoch, drawn as stage one draws views
            drawn = [
                draw_view(self.online_views, self.table.shard_names[self.table.shard[i]], self.table.key(i), 1 + int(e),
                          *image.size)
                for i, e, image in zip(sample_ids, epochs, images)
            ]
            return np.stack([box for box, _ in drawn]), np.array([flip for _, flip in drawn]), None
        if self.rows is None:
            return np.stack([center_box(*image.size, self.eval_crop) for image in images]), np.zeros(n, bool), None
        first, count = (1, self.num_views - 1) if self.crops_only else (0, self.num_views)
        views = np.array([
            first + (epoch + _view_offset(self.table.shard_names[self.table.shard[i]], self.table.key(i))) % count
            for i, epoch in zip(sample_ids, epochs)
        ])
        targets = self.rows.get(sample_ids).pick(views)
        return targets.boxes.numpy(), targets.flips.numpy(), targets

    def _student_pixels(self, image, box, flip) -> np.ndarray:
        if self.rows is None and self.online_views is None:  # evaluation
            if self.eval_view == "reference":
                return render_reference_eval(image, self.image_size)
            return render_view(image, box, bool(flip), self.image_size)
        return render_view(image, box, bool(flip), self.image_size, via=self.via_size)

    def _batch(self, reader: _ImageReader, index: int) -> dict:
        sample_ids, epochs = self.stream.batch(index)
        images = []
        for sample_id in sample_ids:
            try:
                images.append(decode_rgb(reader.read(int(sample_id))))
            except UserError:
                raise
            except Exception as error:
                raise reader.undecodable(int(sample_id), error) from None
        boxes, flips, targets = self._views(sample_ids, epochs, images)
        batch = {
            "ids": torch.from_numpy(sample_ids),
            "keys": tuple(self.table.key(int(i)) for i in sample_ids),
            "labels": torch.from_numpy(self.table.label[sample_ids]),
            "boxes": torch.from_numpy(boxes.astype(np.int32)),
            "flips": torch.from_numpy(np.asarray(flips, bool)),
            "pixels": torch.from_numpy(np.stack([
                self._student_pixels(image, box, flip) for image, box, flip in zip(images, boxes, flips)
            ])),
        }
        for size in self.extra_sizes:
            batch[f"pixels_{size[0]}"] = torch.from_numpy(np.stack([
                render_view(image, box, bool(flip), size) for image, box, flip in zip(images, boxes, flips)
            ]))
        if targets is not None:
            batch["teacher"] = targets
        return batch


def training_samples(manifest: Manifest, split, reader: CacheReader | None, *, batch_size: int, world: int,
                     needs_unlabeled: bool, where: str, warn: bool = True):
    """(table, labeled ids, unlabeled ids, counts) of a split, for training.

    Samples stage one could not decode (--on-error skip) have no teacher targets: skipped and counted.
    Streams that cannot fill a step are refused, naming the numbers; a labeled set smaller than the
    batch (each labeled sample then appears several times per step) is a warning (logged if `warn`)."""
    table = SampleTable.from_manifest(manifest)
    usable = ~np.concatenate(reader.missing_masks()) if reader else np.ones(len(table.shard), bool)
    labeled = table.ids_of(split.labeled_mask(manifest))
    unlabeled = table.ids_of(split.unlabeled_mask(manifest))
    counts = {"labeled": int(usable[labeled].sum()), "unlabeled": int(usable[unlabeled].sum()),
              "skipped_missing": int((~usable[labeled]).sum() + (~usable[unlabeled]).sum())}
    labeled, unlabeled = labeled[usable[labeled]], unlabeled[usable[unlabeled]]
    warnings = check_stream_sizes(table, labeled, unlabeled if needs_unlabeled else None, batch_size=batch_size,
                                  world=world, where=where)
    for warning in warnings if warn else ():
        logging.getLogger("dho_pipeline").warning("warning: %s", warning)
    return table, labeled, unlabeled, counts


def check_stream_sizes(table: SampleTable, labeled: np.ndarray, unlabeled: np.ndarray | None, *, batch_size: int,
                       world: int, where: str) -> list[str]:
    """Refuse streams too small for the global batch or the processes; return warnings.

    Labeled samples are dealt to processes one by one, unlabeled ones a whole shard at a time."""
    n = len(labeled)
    if n < world:
        have = f"{n} labeled samples" if n else "no labeled samples (that the cache holds)"
        raise UserError(f"{where} has {have}, fewer than the {world} process(es); each needs at least one")
    warnings = []
    if batch_size > n:
        warnings.append(f"--batch-size {batch_size} is larger than the {n} labeled samples of {where}: each labeled "
                        f"sample appears about {batch_size / n:.1f} times per step")
    if unlabeled is None:
        return warnings
    u = len(unlabeled)
    if u == 0:
        raise UserError(f"{where} has no unlabeled samples (that the cache holds); this objective trains on "
                        "unlabeled images too: draw a split that leaves some unlabeled, or use --objective ce")
    if batch_size > u:
        raise UserError(f"--batch-size {batch_size} is larger than the {u} unlabeled samples of {where} (an epoch "
                        f"would be less than one step); use --batch-size {u} or less")
    per_shard = np.sort(np.bincount(table.shard[unlabeled])[np.unique(table.shard[unlabeled])])
    if len(per_shard) < world:
        raise UserError(f"the {u} unlabeled samples of {where} lie in {len(per_shard)} shard(s), fewer than the "
                        f"{world} processes (each takes whole shards); use at most {len(per_shard)} processes, "
                        "or more, smaller shards")
    fewest = int(per_shard[: len(per_shard) // world].sum())  # a process's share in the worst epoch
    if fewest < batch_size // world:
        warnings.append(f"a process may get only {fewest} unlabeled samples in an epoch (whole shards, dealt anew "
                        f"each epoch), fewer than its {batch_size // world} per step: they repeat within the step")
    return warnings


def training_loaders(table: SampleTable, labeled: np.ndarray, unlabeled: np.ndarray | None, *, image_size,
                     micro_batch: int, seed: int, rank: int, world: int, positions: dict[str, int], workers: int,
                     reader: CacheReader | None = None, online_views: ViewPolicy | None = None,
                     teacher_size: tuple[int, int] | None = None, pin_memory: bool = False,
                     via_size: tuple[int, int] | None = None, crops_only: bool = False) -> dict:
    """DataLoaders of the labeled and (unless None) unlabeled streams, from batch `positions[name]` on.

    With a cache `reader` each sample shows a cached view with its teacher targets (with `crops_only`,
    never view 0, the whole-image view); with `online_views` a fresh view per epoch, also rendered at
    `teacher_size` for a teacher run online. `via_size`: student views rendered through that size.
    """

    def loader(order, first, rows):
        dataset = StudentBatches(
            table, IdStream(order, micro_batch), image_size, rows=rows, num_views=reader.num_views if reader else 1,
            first_batch=first, online_views=online_views, extra_sizes=(teacher_size,) if teacher_size else (),
            via_size=via_size, crops_only=crops_only,
        )
        return StudentLoader(dataset, workers, pin_memory=pin_memory, prefetch_factor=4 if workers else None)

    loaders = {"labeled": loader(labeled_order(labeled, seed, rank, world), positions["labeled"],
                                 PreloadedRows(reader, table, labeled) if reader else None)}
    if unlabeled is not None:
        loaders["unlabeled"] = loader(unlabeled_order(table, unlabeled, seed, rank, world), positions["unlabeled"],
                                      ShardRows(reader, table) if reader else None)
    return loaders


class StudentLoader:
    """A DataLoader over StudentBatches whose workers' errors reach the caller as the one line they
    would raise with no workers, and whose workers die with this process (processes.worker_init)."""

    def __init__(self, dataset: StudentBatches, workers: int, **options):
        from .processes import worker_init_fn

        self.loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                                  worker_init_fn=worker_init_fn() if workers else None, **options)

    def __len__(self) -> int:  # a progress bar's total (evaluation passes know their batch count)
        if self.loader.dataset.num_batches is None:
            raise TypeError("an endless stream of batches has no length")
        return self.loader.dataset.num_batches  # batches first_batch .. first_batch + num_batches - 1

    def __iter__(self):
        for batch in self.loader:
            if "error" in batch:
                raise UserError(batch["error"])
            yield batch
