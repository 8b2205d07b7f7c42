"""Stage one's data path: does cache-teacher keep up with plain decoding? Does decode-once pay?

    BENCH_OUT=bench/results/cpu-2026-11-30 .venv/bin/python bench/stage1_datapath.py [--shards 4 --per-shard 64]

On ImageNet-like JPEG shards (500 x 375), measured side by side in one run, one process, no DataLoader
workers (so the figures compare work, not parallelism):
  A. bare loop: read the tar, decode each image, render its views at 224 px and normalise them
     (the model input, made exactly as the pipeline makes it, in batches of 256 views);
  B. `cache-teacher` with a near-free teacher (a 1-layer, width-16 ViT at 224 px), same views, writing
     the real Zarr cache; its per-image time excludes set-up (measured by a rerun on the finished cache);
  C. with 8 views: the bare loop decoding once per image vs once per view.
Targets: B / A >= 0.9; C's decode-once speedup reported. Each side is timed by CPU seconds of this
process (the headline: the machine's cores are shared, and other people's work stretches wall-clock
time) and by wall-clock seconds; JSON: views_<1|8>.<cpu|wall>.{bare_per_second, cache_teacher_per_second,
ratio, *_seconds}, decode_once_8_views.<cpu|wall>.{decode_once_per_second, decode_per_view_per_second, ratio}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from common import Timer, save, side_by_side, write_class_lists, write_jpeg_shards

SIZE = (224, 224)
FREE_TEACHER = {
    "embed_dim": 16, "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 1, "width": 16, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1},
}


def bare_loop(paths, views: int, decode_per_view: bool = False) -> int:
    import torch

    from dho_pipeline.pixels import Normalizer
    from dho_pipeline.shards import iter_shard_samples
    from dho_pipeline.views import VIEW0_WHOLE, ViewPolicy, decode_rgb, draw_views, render_view

    policy = ViewPolicy(num_views=views, seed=0, view0=VIEW0_WHOLE)
    normalize = Normalizer((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), torch.device("cpu"))
    count, pending = 0, []
    for path in paths:
        for sample in iter_shard_samples(path):
            image = decode_rgb(sample["jpg"])
            boxes, flips = draw_views(policy, path.name, sample["__key__"], *image.size)
            for v in range(views):
                source = decode_rgb(sample["jpg"]) if decode_per_view and v else image
                pending.append(render_view(source, boxes[v], flips[v], SIZE))
            if len(pending) >= 256:
                normalize(torch.from_numpy(np.stack(pending)))
                pending = []
            count += 1
    if pending:
        normalize(torch.from_numpy(np.stack(pending)))
    return count


def cache_teacher_time(paths, folder: Path, views: int) -> SimpleNamespace:
    """Time cache-teacher spends per run beyond its set-up (teacher build, class embeddings): a full run
    minus the same command on the finished cache (set-up, plus the integrity check of each complete
    shard that only a rerun makes: timed on its own and left out of the set-up); wall-clock and CPU seconds."""
    import shutil

    from dho_pipeline.stages import cache_teacher, manifest

    for old in folder.glob(f"*{views}.zarr*"):  # a fresh cache each repeat
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    (folder / "free.json").write_text(json.dumps(FREE_TEACHER))
    write_class_lists(folder)
    manifest.run(manifest.Config(shards=tuple(str(p) for p in paths), out=folder / "m.json"))
    config = dict(manifest=folder / "m.json", teacher=str(folder / "free.json"), pretrained="none",
                  classnames=folder / "classes.txt", templates=folder / "templates.txt", views=views, workers=0,
                  batch_size=256, topk=100)
    cache_teacher.run(cache_teacher.Config(out=folder / f"warm{views}.zarr", **config))  # first-call costs
    with Timer() as full:
        cache_teacher.run(cache_teacher.Config(out=folder / f"c{views}.zarr", **config))
    with Timer() as rerun:
        cache_teacher.run(cache_teacher.Config(out=folder / f"c{views}.zarr", **config))
    from dho_pipeline.cache_store import TeacherCache
    from dho_pipeline.manifest import load_manifest

    cache, shards = TeacherCache.open(folder / f"c{views}.zarr"), load_manifest(folder / "m.json").shards
    with Timer() as checks:  # what the rerun did beyond set-up: every complete shard checked
        for index, shard in enumerate(shards):
            cache.shard_problem(index, shard.keys, shard.fingerprint)
    setup_seconds, setup_cpu = rerun.seconds - checks.seconds, rerun.cpu_seconds - checks.cpu_seconds
    return SimpleNamespace(seconds=full.seconds - setup_seconds, cpu_seconds=full.cpu_seconds - setup_cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # one core for everything: compare work, not thread counts
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        paths = write_jpeg_shards(folder / "shards", args.shards, args.per_shard)
        images = args.shards * args.per_shard
        bare_loop(paths[:1], 1)  # warm the page cache and imports
        figures = {"images": images, "image_size": [500, 375], "render_size": list(SIZE), "repeats": args.repeats}
        for views in (1, 8):
            # Interleaved repeats, median of each: the two sides see the same machine conditions.
            bare, pipeline = [], []
            for _ in range(args.repeats):
                with Timer() as timer:
                    bare_loop(paths, views)
                bare.append(timer)
                pipeline.append(cache_teacher_time(paths, folder, views))
            figures[f"views_{views}"] = side_by_side(bare, pipeline, images, ("bare", "cache_teacher"))
            cpu, wall = figures[f"views_{views}"]["cpu"], figures[f"views_{views}"]["wall"]
            print(f"{views} view(s), CPU time: bare decode+render+normalise {cpu['bare_per_second']:.1f} img/s, "
                  f"cache-teacher {cpu['cache_teacher_per_second']:.1f} img/s, ratio {cpu['ratio']:.3f} (target >= 0.9); "
                  f"wall-clock ratio {wall['ratio']:.3f}")
        once, per_view = [], []
        for _ in range(args.repeats):
            for series, per_view_decode in ((once, False), (per_view, True)):
                with Timer() as timer:
                    bare_loop(paths, 8, decode_per_view=per_view_decode)
                series.append(timer)
        figures["decode_once_8_views"] = side_by_side(per_view, once, images, ("decode_per_view", "decode_once"))
        cpu = figures["decode_once_8_views"]["cpu"]
        print(f"8 views, CPU time: decode once {cpu['decode_once_per_second']:.1f} img/s vs decode per view "
              f"{cpu['decode_per_view_per_second']:.1f} img/s: speedup {cpu['ratio']:.2f}x")
    save("stage1_datapath", figures)


if __name__ == "__main__":
    main()
