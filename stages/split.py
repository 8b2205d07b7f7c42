"""Draw the labeled / held-out / unlabeled split of a manifest.

    dho-pipeline split --manifest M.json --percent 1 --seed 13 --holdout 5 --out splits/1pct.json
    dho-pipeline split --manifest M.json --from-list 1percent.txt --out splits/simclr-1pct.json

The labeled stream of `train` reads only the labeled images, straight from their byte offsets in the
shards (recorded by the manifest), so it never scans the unlabeled data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .options import setting


@dataclass(frozen=True, kw_only=True)
class Config:
    manifest: Path = setting(help="Manifest of the training shards.")
    out: Path = setting(help="Split file to write (JSON).")
    percent: float = setting(1.0, help="Labeled share of the data set, class-balanced.")
    seed: int = setting(13, help="Seed of the draw (the reference uses 13).")
    holdout: int = setting(0, help="Labeled images per class held out for calibration, never trained on.")
    from_list: Path | None = setting(None, help="Use the images this file names (one per line) as the labeled set.")


def run(config: Config):
    from dho_pipeline.manifest import load_manifest
    from dho_pipeline.split import draw_split, save_split, split_warnings
    from dho_pipeline.prompts import read_lines

    from .common import log

    manifest = load_manifest(config.manifest)
    names = read_lines(config.from_list, "image list") if config.from_list else None
    split = draw_split(
        manifest, percent=config.percent, seed=config.seed, holdout_per_class=config.holdout,
        from_list=names, list_name=str(config.from_list) if config.from_list else None,
    )
    save_split(split, Path(config.out))
    for warning in split_warnings(split, manifest):
        log.warning("warning: %s", warning)
    return split
