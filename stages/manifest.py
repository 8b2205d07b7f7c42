"""Scan WebDataset shards into a manifest (no image decoding).

    dho-pipeline manifest 'data/train-{000000..001023}.tar' --out manifests/imagenet-train.json

Each shard is read once, start to end: its keys, labels (`.cls`, or a `.json` member's "label"), where
each image's bytes lie, and the file's sha256. Shards are scanned in parallel threads (reading and
hashing release the GIL).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dho_pipeline.errors import UserError


@dataclass(frozen=True, kw_only=True)
class Config:
    shards: tuple[str, ...]  # paths, brace patterns or globs
    out: Path
    workers: int = 4  # shards scanned at once


def run(config: Config):
    from tqdm import tqdm

    from dho_pipeline.manifest import build_manifest, entry_from_scan, save_manifest
    from dho_pipeline.shards import expand_shard_patterns, scan_shard

    paths = expand_shard_patterns(list(config.shards))
    if not paths:
        raise UserError("no shards given")
    absent = [p for p in paths if not p.is_file()]
    if absent:
        more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
        raise UserError(f"shard {absent[0]} does not exist{more}")
    with ThreadPoolExecutor(max_workers=max(1, config.workers)) as pool:
        scans = list(tqdm(pool.map(scan_shard, paths), total=len(paths), unit="shard", desc="manifest"))
    manifest = build_manifest([entry_from_scan(path, scan) for path, scan in zip(paths, scans)])
    save_manifest(manifest, Path(config.out))
    return manifest
