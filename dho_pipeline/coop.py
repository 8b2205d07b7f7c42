"""Data sets as CoOp lays them out: its split files, and FGVC-Aircraft's own lists.

A CoOp split file (`split_zhou_<Dataset>.json`, as published with CoOp and used by Tip-Adapter and DHO):

    {"train": [["<image path relative to the image folder>", <label>, "<class name>"], ...],
     "val": [...], "test": [...]}

Image folders (the path the split's paths are relative to): Caltech101 `caltech-101/101_ObjectCategories`,
DTD `dtd/images`, EuroSAT `eurosat/2750`, Food101 `food-101/images`, Oxford Flowers `oxford_flowers/jpg`,
Oxford Pets `oxford_pets/images`, Stanford Cars `stanford_cars` (the data set's own folder), SUN397
`sun397/SUN397`, UCF101 `ucf101/UCF-101-midframes`.

FGVC-Aircraft has no split file: its `variants.txt` lists the classes (label = line number, file order)
and `images_variant_{train,val,test}.txt` the images, one `<image id> <class name>` a line; images are
`<image folder>/<image id>.jpg` with the image folder `fgvc-aircraft-2013b/data/images`.

Class names are the split's own (CoOp renamed some when it made the splits), with underscores turned
into spaces, as CoOp, Tip-Adapter and DHO do when they fill the prompt templates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .shard_writer import SampleSource, unique_keys
from .shards import IMAGE_EXTENSIONS

PARTS = ("train", "val", "test")
FGVC_CLASSES = "variants.txt"


@dataclass(frozen=True)
class Item:
    path: str  # relative to the image folder
    label: int


@dataclass
class CoopDataset:
    parts: dict[str, list[Item]]  # train / val / test
    classnames: list[str]  # in label order, underscores as spaces
    source: str  # the file it was read from, for messages


def read_coop(path: str | Path) -> CoopDataset:
    """A CoOp split file, or FGVC-Aircraft's `variants.txt` (or the folder holding it)."""
    path = Path(path)
    if path.is_dir() and (path / FGVC_CLASSES).is_file():
        path = path / FGVC_CLASSES
    if path.name == FGVC_CLASSES:
        return read_fgvc_aircraft(path)
    return read_split_file(path)


def read_split_file(path: Path) -> CoopDataset:
    from .jsonfiles import read_json

    document = read_json(path, "CoOp split", "give a split_zhou_<Dataset>.json file as CoOp publishes it")
    if not isinstance(document, dict) or "train" not in document:
        raise UserError(f"CoOp split {path} is not a split file (a JSON object with train / val / test lists)")
    parts, names = {}, {}
    for part in PARTS:
        entries = document.get(part, [])
        if not isinstance(entries, list):
            raise UserError(f"CoOp split {path}: '{part}' must be a list of [image path, label, class name]")
        items = []
        for number, entry in enumerate(entries):
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                    and isinstance(entry[1], int) and not isinstance(entry[1], bool) and entry[1] >= 0
                    and isinstance(entry[2], str)):
                raise UserError(f"CoOp split {path}: {part}[{number}] is {json.dumps(entry)[:120]}, not "
                                "[image path, label, class name]")
            _name_label(names, entry[1], entry[2], f"CoOp split {path}: {part}[{number}]")
            items.append(Item(entry[0], entry[1]))
        parts[part] = items
    return CoopDataset(parts, _classnames(names, path), str(path))


def read_fgvc_aircraft(variants: Path) -> CoopDataset:
    from .prompts import read_lines

    classes = read_lines(variants, "FGVC-Aircraft variants")
    label_of = {name: label for label, name in enumerate(classes)}
    parts = {}
    for part in PARTS:
        listing = variants.with_name(f"images_variant_{part}.txt")
        items = []
        for number, line in enumerate(read_lines(listing, "FGVC-Aircraft image list"), start=1):
            image, _, name = line.partition(" ")
            if name not in label_of:
                raise UserError(f"{listing}, line {number}: class {name!r} is not in {variants}")
            items.append(Item(f"{image}.jpg", label_of[name]))
        parts[part] = items
    return CoopDataset(parts, [name.replace("_", " ") for name in classes], str(variants))


def _name_label(names: dict[int, str], label: int, name: str, where: str) -> None:
    if names.setdefault(label, name) != name:
        raise UserError(f"{where}: label {label} is named {name!r} here but {names[label]!r} before")


def _classnames(names: dict[int, str], path: Path) -> list[str]:
    if not names:
        raise UserError(f"CoOp split {path} lists no images")
    absent = [label for label in range(max(names) + 1) if label not in names]
    if absent:
        raise UserError(f"CoOp split {path}: labels must run 0..C-1 without gaps (label {absent[0]} has no image)")
    return [names[label].replace("_", " ") for label in range(len(names))]


def part_samples(dataset: CoopDataset, part: str, image_folder: Path) -> list[SampleSource]:
    """The samples of one part, every image checked to exist under `image_folder` first."""
    items = dataset.parts[part]
    missing = [item.path for item in items if not (image_folder / item.path).is_file()]
    if missing:
        raise UserError(f"{len(missing)} of the {len(items)} {part} images of {dataset.source} are not under "
                        f"{image_folder}, e.g. {missing[0]}; give the folder the split's paths are relative to")
    odd = [item.path for item in items if Path(item.path).suffix.lower().lstrip(".") not in IMAGE_EXTENSIONS]
    if odd:
        raise UserError(f"{dataset.source}: {odd[0]} is not an image file ({', '.join(IMAGE_EXTENSIONS)})")
    keys = unique_keys([str(Path(item.path).with_suffix("")) for item in items])
    return [SampleSource(key=key, ext=Path(item.path).suffix.lower().lstrip("."), label=item.label,
                         path=image_folder / item.path) for key, item in zip(keys, items)]
