"""Cache size: bytes per view on disk, per k and compression, written by the real cache writer.

    BENCH_OUT=bench/results/cpu-2026-11-30 .venv/bin/python bench/cache_size.py

Two kinds of teacher logits over 1000 classes (bench/common.py), two temperatures, 8 views per image
with real RandomResizedCrop boxes, written as one complete shard by TeacherCache.write_shard with each
compression choice:
  independent  CLIP-like logits drawn independently for every view (`clip_like_logits`);
  correlated   the views of one image share its class structure (`LatentClip`), as a real teacher's do.
Bytes per view count the shard's array chunks (boxes, flips, keys and log-partitions included; the
small zarr.json metadata files excluded). Also what ImageNet-1k (1,281,167 images) would take at 1, 8
and 32 views. Targets: <= 48 B/view at k = 10, <= 330 at k = 100.

JSON: results.<independent|correlated>.<k>.bytes_per_view.<compression>, .uncompressed_per_view;
imagenet_gb.<logits>.k<k>.<views>; targets.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from common import LatentClip, clip_like_logits, save

IMAGENET = 1_281_167
KS = [5, 10, 20, 50, 100, 1000]


def build_shard(logits, k: int, images: int, views: int, seed: int = 0):
    import torch

    from dho_pipeline.cache_store import ShardData, index_dtype
    from dho_pipeline.teacher import summarize_logits
    from dho_pipeline.views import VIEW0_WHOLE, ViewPolicy, draw_views

    indices, values, log_partition = summarize_logits(torch.from_numpy(logits), k, [1.0, 2.0])
    keys = [f"n{seed:02d}_{i:08d}" for i in range(images)]
    data = ShardData.empty(keys, views, k, 2, index_dtype(1000))
    policy = ViewPolicy(num_views=views, seed=0, view0=VIEW0_WHOLE)
    rng = np.random.default_rng(seed)
    for i, key in enumerate(keys):
        data.boxes[i], data.flips[i] = draw_views(policy, "bench.tar", key, int(rng.integers(300, 600)), int(rng.integers(250, 500)))
    data.topk_index[:] = indices.view(images, views, k).numpy()
    data.topk_logit[:] = values.view(images, views, k).numpy()
    data.log_partition[:] = log_partition.view(images, views, 2).numpy()
    return data


def bytes_per_view(data, compression: str, k: int) -> float:
    from dho_pipeline.cache_store import CacheSpec, TeacherCache

    images, views = data.topk_logit.shape[:2]
    spec = CacheSpec(
        teacher={"model": "bench", "pretrained": "none", "weights_fingerprint": "x"}, classnames=[f"c{i}" for i in range(1000)],
        templates=["{}"], preprocess={}, views={"num_views": views}, topk=k, temperatures=[1.0, 2.0], logit_scale=100.0,
        manifest_fingerprint="x", shards=[{"name": "bench.tar", "num_samples": images}],
    )
    with tempfile.TemporaryDirectory() as folder:
        cache = TeacherCache.create_or_resume(Path(folder) / "c.zarr", spec)
        cache.compression = compression
        cache.write_shard(0, data)
        shard_dir = Path(folder) / "c.zarr" / "shards" / "000000"
        size = sum(f.stat().st_size for f in shard_dir.rglob("*") if f.is_file() and f.name != "zarr.json")
    return size / (images * views)


def measure(logits: np.ndarray, images: int, views: int) -> dict:
    from dho_pipeline.cache_store import COMPRESSIONS

    print(f"{'k':>6} " + "".join(f"{c:>12}" for c in COMPRESSIONS) + f"{'raw':>8}")
    results = {}
    for k in KS:
        data = build_shard(logits, k, images, views)
        raw = 2 * k + 2 * k + 8 + 8 + 1  # index, logit, 2 log-partitions, box, flip (+ key, missing per image)
        row = {c: bytes_per_view(data, c, k) for c in COMPRESSIONS}
        results[str(k)] = {"bytes_per_view": row, "uncompressed_per_view": raw}
        print(f"{'all' if k == 1000 else k:>6} " + "".join(f"{row[c]:>12.1f}" for c in COMPRESSIONS) + f"{raw:>8}")
    return results


def main() -> None:
    from dho_pipeline.cache_store import COMPRESSIONS, DEFAULT_COMPRESSION

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1250, help="images in the shard (ImageNet-style shard size)")
    parser.add_argument("--views", type=int, default=8)
    args = parser.parse_args()
    logits = {"independent": clip_like_logits(args.images * args.views),
              "correlated": LatentClip(args.images, args.views).teacher_logits()}
    results, imagenet = {}, {}
    for name, values in logits.items():
        print(f"\n{name} logits: bytes per view ({args.images} images x {args.views} views, 1000 classes, T = 1 and 2)")
        results[name] = measure(values, args.images, args.views)
        imagenet[name] = {f"k{k}": {str(v): IMAGENET * v * results[name][str(k)]["bytes_per_view"][DEFAULT_COMPRESSION] / 1e9
                                    for v in (1, 8, 32)} for k in (10, 100)}
        print(f"ImageNet-1k ({IMAGENET:,} images), {DEFAULT_COMPRESSION}: " + "; ".join(
            f"k = {k}: " + " / ".join(f"{gb:.2f}" for gb in imagenet[name][f"k{k}"].values()) + " GB at 1 / 8 / 32 views"
            for k in (10, 100)))
    smallest = {name: min(COMPRESSIONS, key=lambda c: results[name]["100"]["bytes_per_view"][c]) for name in results}
    targets = {name: {"k10_bytes_per_view": results[name]["10"]["bytes_per_view"][DEFAULT_COMPRESSION], "k10_target": 48,
                      "k100_bytes_per_view": results[name]["100"]["bytes_per_view"][DEFAULT_COMPRESSION],
                      "k100_target": 330} for name in results}
    print(f"\nsmallest at k = 100: {smallest}; targets ({DEFAULT_COMPRESSION}): {targets}")
    save("cache_size", {"images": args.images, "views": args.views, "default_compression": DEFAULT_COMPRESSION,
                        "smallest_at_k100": smallest, "results": results, "imagenet_gb": imagenet,
                        "targets": targets})


if __name__ == "__main__":
    main()
