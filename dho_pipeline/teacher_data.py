"""Stage one's input stream: whole shards, read in order, each image decoded once, all views rendered.

`ViewBatches` is an IterableDataset for a torch DataLoader. Each worker takes whole shards (shard i
of its list goes to worker i mod workers), reads each shard front to back, checks every key against
the manifest, decodes each image once and renders all of its views from that one decode. It yields
batches of up to `images_per_batch` images from a single shard, as uint8 HWC pixels (normalisation
happens on the device, on 4x fewer bytes).

Each shard is hashed as it is read: its last batch carries the sha256 of every byte of the file
(`sha256`), which the main process compares with the manifest before the shard may be marked complete.

Workers never raise: a fault is yielded as a batch with an `error` message (one line, naming shard and
key), so the main process can report it cleanly instead of a worker traceback.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .hashing import HashingReader
from .shards import image_field, iter_shard_samples
from .views import ViewPolicy, decode_rgb, describe_decode_error, draw_views, render_view


@dataclass(frozen=True)
class ShardTask:
    index: int  # position of the shard in the manifest
    name: str
    path: str
    keys: list[str]


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _batch(task: ShardTask, rows: list[dict], read_seconds: float, error: str | None = None,
           sha256: str | None = None) -> dict:
    valid = [row for row in rows if not row["missing"]]
    pixels = torch.from_numpy(np.concatenate([row["pixels"] for row in valid])) if valid else torch.empty(0)
    return {
        "shard": task.index,
        "positions": torch.tensor([row["position"] for row in rows], dtype=torch.int64),
        "missing": torch.tensor([row["missing"] for row in rows], dtype=torch.bool),
        "reasons": [row.get("reason", "") for row in rows],
        "boxes": torch.from_numpy(np.stack([row["boxes"] for row in rows])) if rows else torch.empty(0),
        "flips": torch.from_numpy(np.stack([row["flips"] for row in rows])) if rows else torch.empty(0),
        "pixels": pixels,  # uint8 [valid images * V, H, W, 3]
        "read_seconds": read_seconds,
        "error": error,
        "sha256": sha256,  # the shard file's, on its last batch only
    }


class ViewBatches(IterableDataset):
    def __init__(
        self,
        tasks: list[ShardTask],
        policy: ViewPolicy,
        image_size: tuple[int, int],
        images_per_batch: int,
        skip_bad_images: bool,
    ):
        self.tasks = tasks
        self.policy = policy
        self.image_size = image_size
        self.images_per_batch = images_per_batch
        self.skip_bad_images = skip_bad_images

    def __iter__(self):
        worker = get_worker_info()
        tasks = self.tasks if worker is None else self.tasks[worker.id :: worker.num_workers]
        for task in tasks:
            yield from self._shard_batches(task)

    def _render(self, task: ShardTask, position: int, sample: dict) -> dict:
        key = sample["__key__"]
        field = image_field(sample)
        try:
            if field is None:
                raise ValueError("no image member")
            image = decode_rgb(sample[field])
        except Exception as error:  # PIL raises many types for bad image bytes
            reason = describe_decode_error(error)
            return {"position": position, "missing": True, "reason": reason, "key": key}
        boxes, flips = draw_views(self.policy, task.name, key, image.width, image.height)
        pixels = np.stack([render_view(image, boxes[v], flips[v], self.image_size) for v in range(len(boxes))])
        return {"position": position, "missing": False, "boxes": boxes, "flips": flips, "pixels": pixels}

    def _shard_batches(self, task: ShardTask):
        rows: list[dict] = []
        started = time.perf_counter()

        def flush(error=None, sha256=None):
            nonlocal started
            batch = _batch(task, rows, time.perf_counter() - started, error, sha256)
            rows.clear()  # in place: _read_shard appends to this same list
            started = time.perf_counter()
            return batch

        try:
            raw = open(task.path, "rb")
        except OSError as error:
            yield flush(f"shard {task.name} cannot be opened ({one_line(error)}); restore it and rerun")
            return
        with raw:
            stream = HashingReader(raw)
            outcome = yield from self._read_shard(task, stream, rows, flush)
            if outcome is None:
                return
            position = outcome
            try:
                sha256 = stream.finish()  # the tar's end padding too: every byte of the file
            except OSError as error:
                yield flush(f"shard {task.name} is unreadable ({one_line(error)}); re-copy it and rerun")
                return
        if position != len(task.keys):
            yield flush(
                f"shard {task.name} ended after {position} of {len(task.keys)} samples (truncated?); "
                "re-copy it and rerun"
            )
            return
        yield flush(sha256=sha256)  # the last rows, held back until the whole file was hashed

    def _read_shard(self, task: ShardTask, stream, rows: list[dict], flush):
        """Yield full batches of a shard's rows except the last; returns the samples read, or None
        after yielding an error."""
        position = 0
        try:
            for sample in iter_shard_samples(task.path, stream):
                expected = task.keys[position] if position < len(task.keys) else None
                if sample["__key__"] != expected:
                    yield flush(
                        f"shard {task.name}: sample #{position} has key {sample['__key__']!r} where the "
                        f"manifest lists {expected!r}; the shard changed since the manifest was built: rebuild it"
                    )
                    return
                row = self._render(task, position, sample)
                if row["missing"]:
                    if not self.skip_bad_images:
                        yield flush(
                            f"shard {task.name}, key {row['key']!r}: cannot decode the image ({row['reason']}); "
                            "fix or remove it, or pass --on-error skip to record it as missing"
                        )
                        return
                    row["boxes"] = np.zeros((self.policy.num_views, 4), np.uint16)
                    row["flips"] = np.zeros(self.policy.num_views, bool)
                if len(rows) == self.images_per_batch:  # full: hand it on, now that another row has come
                    yield flush()
                rows.append(row)
                position += 1
        except Exception as error:  # tarfile and webdataset errors: truncated or corrupt shard
            yield flush(
                f"shard {task.name} is unreadable after {position} samples ({one_line(error)}); "
                "re-copy it and rerun"
            )
            return None
        return position
