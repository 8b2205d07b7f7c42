"""Draw the labeled / held-out / unlabeled split of a manifest.

    dho-pipeline split --manifest M.json --percent 1 --rule reference --out splits/1pct.json
    dho-pipeline split --manifest M.json --percent 1 --seed 13 --holdout 5 --out splits/1pct-balanced.json
    dho-pipeline split --manifest M.json --from-list 1percent.txt --out splits/simclr-1pct.json
    dho-pipeline split --manifest M.json --shots 16 --seed 1 --out splits/16shot-seed1.json
    dho-pipeline split ... --write-list splits/1pct.txt    # the labeled images' file names, one per line

`--rule reference` draws the DHO reference's own subset, image for image (it needs the original file
names that `dho-pipeline shard` records); `--rule balanced` (the default) draws round(p * N / C) per
class and works on any manifest (dho_pipeline.split says how each draws). The labeled stream of
`train` reads only the labeled images, straight from their byte offsets in the shards (recorded by the
manifest), so it never scans the unlabeled data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dho_pipeline.split import RULES

from .options import setting


@dataclass(frozen=True, kw_only=True)
class Config:
    manifest: Path = setting(help="Manifest of the training shards.")
    out: Path = setting(help="Split file to write (JSON).")
    percent: float = setting(1.0, help="Labeled share of the data set, class-balanced.")
    rule: str = setting("balanced", choices=RULES,
                        help="How the labeled images are drawn: 'reference' = the DHO reference's exact subset "
                             "(needs file names recorded by `shard`); 'balanced' = round(p*N/C) per class, any manifest.")
    seed: int = setting(13, help="Seed of the draw (the reference uses 13).")
    holdout: int = setting(0, help="Labeled images per class held out for calibration, never trained on.")
    shots: int | None = setting(None, help="Few-shot: exactly this many labeled images per class (instead of --percent).")
    from_list: Path | None = setting(None, help="Use the images this file names (one per line: file names with or "
                                     "without class folder and extension, or keys) as the labeled set.")
    write_list: Path | None = setting(None, help="Also write the labeled images' names to this file, one per line "
                                      "(readable by --from-list).")


def run(config: Config):
    from dho_pipeline.manifest import load_manifest
    from dho_pipeline.prompts import read_lines
    from dho_pipeline.split import draw_split, labeled_names, save_split, split_warnings, write_names

    from .common import log

    manifest = load_manifest(config.manifest)
    if config.shots is not None:
        split = _few_shot(config, manifest)
    else:
        names = read_lines(config.from_list, "image list") if config.from_list else None
        split = draw_split(
            manifest, percent=config.percent, seed=config.seed, holdout_per_class=config.holdout,
            from_list=names, list_name=str(config.from_list) if config.from_list else None, rule=config.rule,
        )
    listed = labeled_names(manifest, split) if config.write_list else None
    save_split(split, Path(config.out))
    if listed is not None:
        write_names(Path(config.write_list), listed)
    for warning in split_warnings(split, manifest):
        log.warning("warning: %s", warning)
    return split


def _few_shot(config: Config, manifest):
    from dho_pipeline.errors import UserError
    from dho_pipeline.split import draw_few_shot

    if config.from_list is not None:
        raise UserError("--shots and --from-list each choose the labeled set; give one of them")
    return draw_few_shot(manifest, shots=config.shots, seed=config.seed, holdout_per_class=config.holdout)
