"""Stage two's data path: what does joining the teacher cache cost the training input stream?

    .venv/bin/python bench/stage2_join.py [--shards 4 --per-shard 64]

The unlabeled stream of `train` (read by byte offset, decode, render the view at 224 px, batch), side by
side in one process: with the cache join (each sample's cached box, flip and teacher top-k at T = 2,
read a shard at a time) and without it (the view's box drawn from the view policy instead: the same
rendering work, no cache). Target: with / without >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from common import Timer, save, write_class_lists, write_jpeg_shards
from stage1_datapath import FREE_TEACHER


def build(folder: Path, shards: int, per_shard: int):
    from dho_pipeline.stages import cache_teacher, manifest, split

    paths = write_jpeg_shards(folder / "shards", shards, per_shard, num_classes=10)
    (folder / "free.json").write_text(json.dumps(FREE_TEACHER))
    write_class_lists(folder)
    manifest.run(manifest.Config(shards=tuple(str(p) for p in paths), out=folder / "m.json"))
    cache_teacher.run(cache_teacher.Config(
        manifest=folder / "m.json", out=folder / "c.zarr", teacher=str(folder / "free.json"), pretrained="none",
        classnames=folder / "classes.txt", templates=folder / "templates.txt", views=8, topk=100, workers=0,
    ))
    split.run(split.Config(manifest=folder / "m.json", percent=10, out=folder / "s.json"))


def stream(folder: Path, batches: int, batch_size: int, join: bool) -> int:
    from dho_pipeline.cache_reader import CacheReader
    from dho_pipeline.manifest import load_manifest
    from dho_pipeline.split import load_split
    from dho_pipeline.student_data import IdStream, SampleTable, ShardRows, StudentBatches, unlabeled_order
    from dho_pipeline.views import VIEW0_WHOLE, ViewPolicy

    manifest = load_manifest(folder / "m.json")
    split = load_split(folder / "s.json")
    table = SampleTable.from_manifest(manifest)
    ids = table.ids_of(split.unlabeled_mask(manifest))
    ids_stream = IdStream(unlabeled_order(table, ids, 0, 0, 1), batch_size)
    if join:
        reader = CacheReader.open(folder / "c.zarr", manifest, 2.0)
        dataset = StudentBatches(table, ids_stream, (224, 224), rows=ShardRows(reader, table), num_views=8,
                                 num_batches=batches)
    else:
        policy = ViewPolicy(num_views=2**31 - 1, seed=0, view0=VIEW0_WHOLE)
        dataset = StudentBatches(table, ids_stream, (224, 224), num_batches=batches, online_views=policy)
    return sum(len(batch["ids"]) for batch in dataset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        build(folder, args.shards, args.per_shard)
        batches = max(1, (args.shards * args.per_shard * 9 // 10) // args.batch_size)
        stream(folder, 1, args.batch_size, True)  # warm caches and imports
        with_join, without = [], []
        for _ in range(args.repeats):
            with Timer() as joined:
                samples = stream(folder, batches, args.batch_size, join=True)
            with_join.append(joined.seconds)
            with Timer() as plain:
                stream(folder, batches, args.batch_size, join=False)
            without.append(plain.seconds)
    joined_rate, plain_rate = samples / statistics.median(with_join), samples / statistics.median(without)
    print(f"unlabeled stream, {samples} samples per pass: with the cache join {joined_rate:.1f} samples/s, "
          f"without {plain_rate:.1f} samples/s, ratio {joined_rate / plain_rate:.3f} (target >= 0.95)")
    save("stage2_join", {"samples": samples, "with_join_per_second": joined_rate, "without_per_second": plain_rate,
                         "ratio": joined_rate / plain_rate, "repeats": args.repeats})


if __name__ == "__main__":
    main()
