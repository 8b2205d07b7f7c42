"""Scan WebDataset shards into a manifest (no image decoding).

    dho-pipeline manifest 'data/train-{000000..001023}.tar' --out manifests/imagenet-train.json

Each shard is read once, start to end: its keys, labels (`.cls`, or a `.json` member's "label"), where
each image's bytes lie, and the file's sha256. Shards are scanned in parallel threads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .options import setting


@dataclass(frozen=True, kw_only=True)
class Config:
    shards: tuple[str, ...] = setting(argument=True, help="Shard paths, brace patterns or globs.")
    out: Path = setting(help="Manifest file to write (JSON).")
    workers: int = setting(4, help="Shards scanned at once.")


def run(config: Config):
    from dho_pipeline.manifest import save_manifest, scan_manifest

    manifest = scan_manifest(list(config.shards), config.workers)
    save_manifest(manifest, Path(config.out))
    return manifest
