"""Turn an ImageNet-style class-folder tree, or a data set as CoOp lays it out, into WebDataset shards.

    dho-pipeline shard imagenet/train --out shards/train-%06d.tar --classes manifests/imagenet_wnids.txt
    dho-pipeline shard oxford_pets/images --coop-split oxford_pets/split_zhou_OxfordPets.json \
        --out 'shards/pets/{split}-%06d.tar'

This is how a user gets from an ImageNet download (`train/<synset>/<image>.JPEG`) to the pipeline's
input. Class indices follow the class-list file (folder names, one per line, in label order) or the
sorted folder names (for ImageNet the same order: manifests/imagenet_wnids.txt lists it); folders named
by numbers (ImageNet-V2's 0..999) are labeled by their number.

Beside the shards it writes `classes.txt`: line i names class i, the folder name with underscores as
spaces (`golden_retriever` -> `golden retriever`; ImageNet's WordNet-id folders get CLIP's ImageNet
class names). `manifest` records those names, and `cache-teacher` and `train` use them by default.
Numbered folders get none: their names are the original data set's (ImageNet's, the default).

With `--coop-split` (dho_pipeline.coop), FOLDER is the folder the split's image paths are relative to;
the train, val and test lists become shards at `--out` with `{split}` replaced by the part's name, and
the class names (the split's, in label order, underscores as spaces) go to `classnames.txt` beside the
train shards.
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
                                   help="Class folder names in label order, one per line; 'imagenet': ImageNet's "
                                   "1000 WordNet ids (also for Sketch, A, R).")
    maxcount: int = setting(1000, help="Samples per shard at most.")
    maxsize: float = setting(1e9, help="Bytes per shard at most.")
    seed: int = setting(0, help="Seed of the sample order (a shuffle of the sorted file list).")
    coop_split: Path | None = setting(None, help="A CoOp split file (split_zhou_<Dataset>.json) or FGVC-Aircraft's "
                                      "variants.txt: shard its train/val/test lists; FOLDER is its image folder.")
    overwrite: bool = setting(False, help="Remove shards that --out names from an earlier run first (else refused).")


def run(config: Config) -> dict:
    from dho_pipeline.progress import progress
    from dho_pipeline.shard_writer import (
        check_pattern, claim_shard_folder, folder_samples, numbered_classes, shuffled, write_class_names, write_shards,
    )
    from dho_pipeline.prompts import read_lines

    check_pattern(config.out)
    if config.coop_split is not None:
        return _coop(config)
    class_list = read_lines(_class_list_file(config.classes), "class-list") if config.classes else None
    samples, classes, skipped = folder_samples(Path(config.folder), class_list)
    claim_shard_folder(config.out, config.overwrite)
    ordered = progress(shuffled(samples, config.seed), total=len(samples), unit="img", desc="shard")
    paths = write_shards(ordered, config.out, maxcount=config.maxcount, maxsize=config.maxsize)
    if class_list is None and numbered_classes(classes):
        names_file, problem = None, ("the class folders are numbers, labels of the original data set (ImageNet-V2's "
                                     "0..999 are ImageNet's classes, the default class names)")
    else:
        names_file, problem = write_class_names(classes, Path(config.out % 0).parent)
    return {"shards": [str(p) for p in paths], "samples": len(samples), "classes": len(classes), "skipped": skipped,
            "classnames": str(names_file) if names_file else None, "classnames_problem": problem}


def _class_list_file(classes: Path) -> Path:
    """A class-list file, or `imagenet` for the WordNet ids that ship (manifests/imagenet_wnids.txt)."""
    from dho_pipeline.package_data import IMAGENET_WNIDS

    return IMAGENET_WNIDS if str(classes) == "imagenet" and not Path(classes).exists() else Path(classes)


def _coop(config: Config) -> dict:
    from dho_pipeline.coop import PARTS, part_samples, read_coop
    from dho_pipeline.errors import UserError
    from dho_pipeline.jsonfiles import write_text_atomically
    from dho_pipeline.shard_writer import claim_shard_folder, shuffled, write_shards

    if "{split}" not in config.out:
        raise UserError(f"--out {config.out!r} needs a {{split}} placeholder with --coop-split, "
                        "e.g. shards/pets/{split}-%06d.tar")
    if config.classes is not None:
        raise UserError("--classes does not apply with --coop-split: the split file names the classes")
    dataset = read_coop(config.coop_split)
    folder = Path(config.folder)
    # Every part is checked before any shard is written.
    samples = {part: part_samples(dataset, part, folder) for part in PARTS if dataset.parts[part]}
    for part in samples:
        claim_shard_folder(config.out.replace("{split}", part), config.overwrite)
    shards, counts = [], {}
    for part, part_list in samples.items():
        pattern = config.out.replace("{split}", part)
        shards += write_shards(shuffled(part_list, config.seed), pattern, maxcount=config.maxcount, maxsize=config.maxsize)
        counts[part] = len(part_list)
    classnames = Path(config.out.replace("{split}", "train") % 0).parent / "classnames.txt"
    write_text_atomically(classnames, "\n".join(dataset.classnames) + "\n")
    return {"shards": [str(p) for p in shards], "samples": sum(counts.values()), "classes": len(dataset.classnames),
            "skipped": 0, "parts": counts, "classnames": str(classnames)}
