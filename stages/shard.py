"""Turn an ImageNet-style class-folder tree into WebDataset shards with `.cls` labels.

    dho-pipeline shard imagenet/train --out shards/train-%06d.tar --classes manifests/imagenet_synsets.txt

This is how a user gets from an ImageNet download (`train/<synset>/<image>.JPEG`) to the pipeline's
input. Class indices follow the class-list file (folder names, one per line, in label order) or the
sorted folder names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, kw_only=True)
class Config:
    folder: Path
    out: str  # shard path pattern with a %d placeholder, e.g. shards/train-%06d.tar
    classes: Path | None = None  # class folder names in label order; default: sorted folder names
    maxcount: int = 1000  # samples per shard at most
    maxsize: float = 1e9  # bytes per shard at most
    seed: int = 0  # sample order: a seeded shuffle of the sorted file list


def run(config: Config) -> dict:
    from dho_pipeline.shard_writer import folder_samples, shuffled, write_shards
    from dho_pipeline.prompts import read_lines

    class_list = read_lines(config.classes, "class-list") if config.classes else None
    samples, classes, skipped = folder_samples(Path(config.folder), class_list)
    paths = write_shards(shuffled(samples, config.seed), config.out, maxcount=config.maxcount, maxsize=config.maxsize)
    return {"shards": [str(p) for p in paths], "samples": len(samples), "classes": len(classes), "skipped": skipped}
