"""Scan WebDataset shards into a manifest (no image decoding).

    dho-pipeline manifest 'data/train-{000000..001023}.tar' --out manifests/imagenet-train.json

Each shard is read once, start to end: its keys, labels (`.cls`, or a `.json` member's "label"), where
each image's bytes lie, and the file's sha256. Shards are scanned in parallel threads.

    dho-pipeline manifest 'new/place/train-*.tar' --relocate manifests/imagenet-train.json --out moved.json

`--relocate` rewrites only the paths of an existing manifest for shards that moved (matched by file
name; each checked by size and sampled blocks, not re-scanned): its fingerprint is unchanged, so its
caches and splits stay valid.
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
    relocate: Path | None = setting(None, help="An existing manifest whose shards moved to SHARDS: write it with "
                                    "their new paths (same fingerprint; caches and splits stay valid).")


def run(config: Config):
    from dho_pipeline.manifest import load_manifest, relocate_manifest, save_manifest, scan_manifest
    from dho_pipeline.shards import expand_shard_patterns

    if config.relocate is not None:
        manifest = relocate_manifest(load_manifest(config.relocate), expand_shard_patterns(list(config.shards)))
    else:
        manifest = scan_manifest(list(config.shards), config.workers)
    save_manifest(manifest, Path(config.out))
    return manifest
