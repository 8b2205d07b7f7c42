"""Stage two's data streams: what each reads, in which order, on which rank, and from where on resume."""

from __future__ import annotations

import numpy as np
import pytest
import webdataset as wds
from helpers import cached_dataset, dump

from dho_pipeline.cache_reader import CacheReader
from dho_pipeline.manifest import load_manifest
from dho_pipeline.split import load_split
from dho_pipeline.views import decode_rgb, render_view
from dho_pipeline.student_data import (
    IdStream, PreloadedRows, SampleTable, StudentBatches, _ImageReader, labeled_order, unlabeled_order,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("streams")
    cached_dataset(root, num_shards=5, per_shard=12, cache_options=("--views", "3"), split_options=("--percent", "20"))
    manifest, split = load_manifest(root / "manifest.json"), load_split(root / "s.json")
    table = SampleTable.from_manifest(manifest)
    return {"root": root, "manifest": manifest, "table": table, "cache": CacheReader.open(root / "c.zarr", manifest, 2.0),
            "labeled": table.ids_of(split.labeled_mask(manifest)), "unlabeled": table.ids_of(split.unlabeled_mask(manifest))}


def test_the_labeled_stream_reads_only_labeled_images(data, monkeypatch):
    read = []
    original = _ImageReader.read
    monkeypatch.setattr(_ImageReader, "read", lambda self, i: (read.append(i), original(self, i))[1])
    stream = IdStream(labeled_order(data["labeled"], 0, 0, 1), 4)
    rows = PreloadedRows(data["cache"], data["table"], data["labeled"])
    batches = list(StudentBatches(data["table"], stream, (32, 32), rows=rows, num_views=3, num_batches=6))
    assert len(read) == 24 and set(read) <= set(data["labeled"].tolist())
    assert all(b["pixels"].shape == (4, 32, 32, 3) and b["teacher"].topk_index.shape[0] == 4 for b in batches)


def test_streams_cover_every_sample_once_per_epoch_and_split_across_ranks(data):
    unlabeled = data["unlabeled"]
    per_rank = [unlabeled_order(data["table"], unlabeled, 3, rank, 2)(0) for rank in (0, 1)]
    assert sorted(np.concatenate(per_rank).tolist()) == sorted(unlabeled.tolist())
    assert not set(per_rank[0]) & set(per_rank[1])
    shards = [set(data["table"].shard[ids]) for ids in per_rank]
    assert not shards[0] & shards[1]  # whole shards per rank: each rank reads its own files
    epochs = [unlabeled_order(data["table"], unlabeled, 3, 0, 1)(e) for e in (0, 1)]
    assert sorted(epochs[0].tolist()) == sorted(epochs[1].tolist()) and not np.array_equal(epochs[0], epochs[1])


def test_any_batch_is_reachable_directly_so_resuming_needs_no_replay(data):
    order = labeled_order(data["labeled"], 0, 0, 1)
    walked = IdStream(order, 5)
    sequence = [walked.batch(b) for b in range(20)]  # crosses several labeled epochs
    fresh = IdStream(order, 5)
    for b in (17, 3, 11):
        ids, epochs = fresh.batch(b)
        assert np.array_equal(ids, sequence[b][0]) and np.array_equal(epochs, sequence[b][1])
    assert max(e for _, es in sequence for e in es) >= 3


def test_views_cycle_through_the_cached_views(data):
    """Over 3 epochs each sample shows each of its 3 cached views once, and the student's pixels are the
    very view (box and flip) whose teacher targets come with them, as `cache dump` lists it."""
    cached = {record["key"]: record["views"] for record in dump(data["root"] / "c.zarr")}
    images = {s["__key__"]: decode_rgb(s["jpg"]) for path in sorted((data["root"] / "shards").glob("*.tar"))
              for s in wds.WebDataset(str(path), shardshuffle=False)}
    stream = IdStream(labeled_order(data["labeled"], 0, 0, 1), len(data["labeled"]))
    rows = PreloadedRows(data["cache"], data["table"], data["labeled"])
    dataset = StudentBatches(data["table"], stream, (32, 32), rows=rows, num_views=3)
    shown = {}
    for batch_index in range(3):  # three labeled epochs
        batch = dataset._batch(_ImageReader(data["table"]), batch_index)
        teacher = batch["teacher"]
        for j, key in enumerate(batch["keys"]):
            box = [round(float(v) / 65535, 6) for v in batch["boxes"][j]]
            flip = bool(batch["flips"][j])
            [view] = [v for v, c in enumerate(cached[key]) if c["box"] == box and c["flip"] == flip]
            assert teacher.topk_index[j].tolist() == cached[key][view]["topk_index"]
            assert teacher.topk_logit[j].tolist() == cached[key][view]["topk_logit"]
            assert teacher.log_partition[j].item() == pytest.approx(cached[key][view]["log_partition"]["2"])  # T = 2
            expected = render_view(images[key], batch["boxes"][j].numpy().astype(np.uint16), flip, (32, 32))
            assert np.array_equal(batch["pixels"][j].numpy(), expected)
            shown.setdefault(key, []).append(view)
    assert len(shown) == len(data["labeled"]) and all(sorted(views) == [0, 1, 2] for views in shown.values())
