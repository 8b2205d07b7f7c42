"""Turn an ImageNet-style class-folder tree into WebDataset shards with `.cls` labels.

    dho-pipeline shard imagenet/train --out shards/train-%06d.tar --classes manifests/imagenet_wnids.txt

This is how a user gets from an ImageNet download (`train/<synset>/<image>.JPEG`) to the pipeline's
input. Class indices follow the class-list file (folder names, one per line, in label order) or the
sorted folder names (for ImageNet the same order: manifests/imagenet_wnids.txt lists it).

Beside the shards it writes `classes.txt`: line i names class i, the folder name with underscores as
spaces (`golden_retriever` -> `golden retriever`; ImageNet's WordNet-id folders get CLIP's ImageNet
class names). `manifest` records those names, and `cache-teacher` and `train` use them by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .options import setting


@dataclass(frozen=True, kw_only=True)
class Config:
    folder: Path = setting(argument=True, help="A class-folder tree: FOLDER/<class>/<image>.")
    out: str = setting(help="Shard path pattern with a %d placeholder, e.g. shards/train-%06d.tar.")
    classes: Path | None = setting(None, default_text="sorted folder names",
                                   help="Class folder names in label order, one per line.")
    maxcount: int = setting(1000, help="Samples per shard at most.")
    maxsize: float = setting(1e9, help="Bytes per shard at most.")
    seed: int = setting(0, help="Seed of the sample order (a shuffle of the sorted file list).")


def run(config: Config) -> dict:
    from dho_pipeline.progress import progress
    from dho_pipeline.shard_writer import folder_samples, shuffled, write_class_names, write_shards
    from dho_pipeline.prompts import read_lines

    class_list = read_lines(config.classes, "class-list") if config.classes else None
    samples, classes, skipped = folder_samples(Path(config.folder), class_list)
    ordered = progress(shuffled(samples, config.seed), total=len(samples), unit="img", desc="shard")
    paths = write_shards(ordered, config.out, maxcount=config.maxcount, maxsize=config.maxsize)
    names_file, problem = write_class_names(classes, Path(config.out % 0).parent)
    return {"shards": [str(p) for p in paths], "samples": len(samples), "classes": len(classes), "skipped": skipped,
            "classnames": str(names_file) if names_file else None, "classnames_problem": problem}
