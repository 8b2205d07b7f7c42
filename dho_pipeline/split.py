"""Label splits: which samples of a manifest are labeled, which are held out, the rest unlabeled.

A split is drawn once (`dho-pipeline split`) and saved as JSON:

    {"format": "dho-pipeline-split", "version": 1,
     "fingerprint": "sha256:...",            # of the content below
     "manifest_fingerprint": "sha256:...",   # the manifest it indexes
     "num_samples": N,                       # in that manifest
     "method": {"rule": "reference", "percent": 1.0, "seed": 13, "holdout_per_class": 0, "from_list": null},
     "num_labeled": L, "num_holdout": H, "num_unlabeled": U,
     "labeled": {"shard-000000.tar": [positions in the shard], ...},
     "holdout": {"shard-000000.tar": [...], ...}}

The labeled set is drawn by one of two rules (`method.rule`), or named by a list (`rule` "list"):

- `reference`: the DHO reference's own subset (erjui/DHO `datasets/imagenet_percent.py`,
  `subset_npercent_dataset`), image for image. Per-class counts start at N/C * p - 1 (clipped to
  [1, class size]), are rounded by a cascade rounding and raised by 1/C until they reach N * p
  (ImageNet-1k: 13 per class, 13,000, at 1%; 128 or 129 per class, 128,286, at 10%); then numpy's
  legacy generator seeded with `seed` (the reference: 13) draws, class by class in label order,
  `choice(positions of the class, count, replace=False)` over positions in torchvision ImageFolder
  order (class folders sorted, file names sorted as plain strings). It needs each image's original
  file name (the manifest's `sources`, which `dho-pipeline shard` records) and every image of the
  folder tree in the manifest (ImageFolder also lists .bmp, .ppm, .pgm and .tif files, which `shard`
  skips and counts; ImageNet has none).
- `balanced`: `round(percent / 100 * N / C)` images per class (13 at 1%, 128 at 10%), drawn with
  numpy's generator seeded by `seed` over manifest order; classes with fewer images give all they
  have. Works on any manifest.

Few-shot splits (`draw_few_shot`, `split --shots N`) take exactly N labeled images per class instead;
their method records `"shots": N`.

The held-out set (`holdout_per_class`, for calibrating alpha and beta) is drawn from the remaining
images of each class and is never trained on (the reference has none: its unlabeled set is every
image not labeled). Unlabeled = every sample neither labeled nor held out.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import UserError
from .hashing import fingerprint_json
from .jsonfiles import read_json, write_text_atomically

if TYPE_CHECKING:  # the manifest module imports webdataset (and torch); stages import RULES from here cheaply
    from .manifest import Manifest

FORMAT = "dho-pipeline-split"
VERSION = 1


@dataclass(frozen=True)
class Split:
    manifest_fingerprint: str
    num_samples: int  # in the manifest
    method: dict
    labeled: dict[str, list[int]]  # shard name -> positions
    holdout: dict[str, list[int]]
    fingerprint: str

    @property
    def num_labeled(self) -> int:
        return sum(len(p) for p in self.labeled.values())

    @property
    def num_holdout(self) -> int:
        return sum(len(p) for p in self.holdout.values())

    @property
    def num_unlabeled(self) -> int:
        return self.num_samples - self.num_labeled - self.num_holdout

    def check_manifest(self, manifest: Manifest, where: str = "split") -> None:
        """The split indexes this manifest: same fingerprint, and every position exists, once."""
        if manifest.fingerprint != self.manifest_fingerprint:
            raise UserError(f"{where} was drawn from a different manifest; draw it again with `dho-pipeline split`")
        sizes = {shard.name: shard.num_samples for shard in manifest.shards}
        for part, chosen in (("labeled", self.labeled), ("holdout", self.holdout)):
            for name, positions in chosen.items():
                if name not in sizes or any(not 0 <= p < sizes[name] for p in positions) or len(set(positions)) != len(positions):
                    raise UserError(f"{where}: its {part} positions in {name} do not fit the manifest; draw it again")

    def labeled_mask(self, manifest: Manifest) -> list[np.ndarray]:
        return _masks(manifest, self.labeled)

    def holdout_mask(self, manifest: Manifest) -> list[np.ndarray]:
        return _masks(manifest, self.holdout)

    def unlabeled_mask(self, manifest: Manifest) -> list[np.ndarray]:
        return [~(a | b) for a, b in zip(self.labeled_mask(manifest), self.holdout_mask(manifest))]


def _masks(manifest: Manifest, chosen: dict[str, list[int]]) -> list[np.ndarray]:
    masks = []
    for shard in manifest.shards:
        mask = np.zeros(shard.num_samples, dtype=bool)
        mask[chosen.get(shard.name, [])] = True
        masks.append(mask)
    return masks


def _content(manifest_fingerprint, num_samples, method, labeled, holdout) -> dict:
    return {
        "manifest_fingerprint": manifest_fingerprint,
        "num_samples": num_samples,
        "method": method,
        "labeled": labeled,
        "holdout": holdout,
    }


def _make(manifest: Manifest, method: dict, labeled_ids: np.ndarray, holdout_ids: np.ndarray) -> Split:
    """From global sample ids (manifest order) to per-shard sorted positions."""
    starts = np.cumsum([0] + [s.num_samples for s in manifest.shards])

    def per_shard(ids: np.ndarray) -> dict[str, list[int]]:
        ids = np.sort(ids)
        out = {}
        for index, shard in enumerate(manifest.shards):
            inside = ids[(ids >= starts[index]) & (ids < starts[index + 1])] - starts[index]
            if len(inside):
                out[shard.name] = inside.tolist()
        return out

    labeled, holdout = per_shard(labeled_ids), per_shard(holdout_ids)
    content = _content(manifest.fingerprint, manifest.num_samples, method, labeled, holdout)
    return Split(**content, fingerprint=fingerprint_json(content))


def all_labels(manifest: Manifest) -> np.ndarray:
    """Labels of every sample in manifest order; an unlabeled sample is an error naming it."""
    manifest_labels = []
    for shard in manifest.shards:
        if shard.labels is None or any(label is None for label in shard.labels):
            position = 0 if shard.labels is None else shard.labels.index(None)
            raise UserError(
                f"shard {shard.name}, key {shard.keys[position]!r} has no label; a split needs labels "
                "(.cls or .json 'label') on every sample"
            )
        manifest_labels.extend(shard.labels)
    return np.asarray(manifest_labels, dtype=np.int64)


RULES = ("balanced", "reference")


def draw_split(manifest: Manifest, *, percent: float, seed: int, holdout_per_class: int = 0,
               from_list: list[str] | None = None, list_name: str | None = None, rule: str = "balanced") -> Split:
    labels = all_labels(manifest)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    method = {"rule": rule, "percent": percent, "seed": seed, "holdout_per_class": holdout_per_class,
              "from_list": list_name}
    if from_list is not None:
        labeled_ids = _ids_from_list(manifest, from_list, list_name or "list")
        method.update(rule="list", percent=None)
    else:
        if not 0 < percent <= 100:
            raise UserError(f"--percent must lie in (0, 100], not {percent}")
        if rule == "reference":
            labeled_ids = reference_labeled_ids(manifest, percent, seed)
        elif rule == "balanced":
            labeled_ids = _balanced_labeled_ids(labels, classes, percent, rng)
        else:
            raise UserError(f"--rule must be one of {', '.join(RULES)}, not {rule!r}")
    holdout_ids = _draw_holdout(labels, classes, labeled_ids, holdout_per_class, rng,
                                "lower --percent (or shorten --from-list)")
    return _make(manifest, method, labeled_ids, holdout_ids)


def _draw_holdout(labels: np.ndarray, classes, labeled_ids: np.ndarray, per_class: int, rng: np.random.Generator,
                  remedy: str) -> np.ndarray:
    """Up to `per_class` images of each class (in `classes` order) that the labeled draw left, drawn by
    `rng` from the class's remaining ids in manifest order; none at all when some were asked is refused."""
    if per_class <= 0:
        return np.zeros(0, dtype=np.int64)
    taken = np.zeros(len(labels), dtype=bool)
    taken[labeled_ids] = True
    holdout_ids = np.concatenate([
        rng.choice(ids, size=min(per_class, len(ids)), replace=False)
        for ids in (np.flatnonzero((labels == c) & ~taken) for c in classes)
    ])
    if len(holdout_ids) == 0:
        raise UserError(
            f"--holdout {per_class} asked, but the labeled draw took all {len(labeled_ids)} of the {len(labels)} "
            f"images, leaving none to hold out; {remedy} so that {per_class} per class remain"
        )
    return holdout_ids


def split_warnings(split: Split, manifest: Manifest) -> list[str]:
    """What a user should know about a split, with the numbers: held-out images short of --holdout, and
    no unlabeled images left (DHO and KD train on unlabeled images)."""
    labels = all_labels(manifest)
    held = np.concatenate(split.holdout_mask(manifest))
    classes = np.unique(labels)
    asked = split.method.get("holdout_per_class") or 0
    warnings = []
    if asked:
        counts = np.array([int(held[labels == c].sum()) for c in classes])
        short = np.flatnonzero(counts < asked)
        if len(short):
            c = short[0]
            warnings.append(
                f"--holdout {asked}: {len(short)} of {len(classes)} classes had fewer than {asked} images left after "
                f"the labeled draw, so {int(counts.sum())} images are held out instead of {asked * len(classes)} "
                f"(class {int(classes[c])}: {int(counts[c])} of {int((labels == classes[c]).sum())} images held out)"
            )
    if split.num_unlabeled == 0:
        warnings.append(
            f"the split leaves no unlabeled images ({split.num_labeled} labeled + {split.num_holdout} held out = all "
            f"{split.num_samples}); DHO and KD train on unlabeled images, so only `train --objective ce` can use it: "
            "lower --percent or --holdout to leave some unlabeled"
        )
    return warnings


def draw_few_shot(manifest: Manifest, *, shots: int, seed: int, holdout_per_class: int = 0) -> Split:
    """Exactly `shots` labeled images per class, the rest unlabeled (few-shot, as CoOp and DHO draw it).

    Recorded as `"method": {"shots": N, "seed": S, "holdout_per_class": H, ...}`. Classes are 0..max label;
    a class with fewer than `shots` images is refused, named by its label (the reference silently repeats
    images of such a class). For each class in label order, `shots` of its images (in manifest order) are
    drawn without replacement by numpy's generator seeded with `seed`; then `holdout_per_class` more from
    the rest of the class, for calibration. Everything else is unlabeled.
    """
    if shots < 1:
        raise UserError(f"--shots must be at least 1, not {shots}")
    labels = all_labels(manifest)
    per_class = [np.flatnonzero(labels == c) for c in range(int(labels.max()) + 1)]
    short = [c for c, ids in enumerate(per_class) if len(ids) < shots]
    if short:
        listed = ", ".join(map(str, short[:10])) + (", ..." if len(short) > 10 else "")
        others = f" ({len(short)} classes are short: {listed})" if len(short) > 1 else ""
        raise UserError(f"class {short[0]} has {len(per_class[short[0]])} images in the manifest, fewer than "
                        f"--shots {shots}{others}; draw fewer shots")
    rng = np.random.default_rng(seed)
    labeled = np.concatenate([rng.choice(ids, size=shots, replace=False) for ids in per_class])
    holdout = _draw_holdout(labels, range(len(per_class)), labeled, holdout_per_class, rng, "draw fewer --shots")
    method = {"rule": "shots", "shots": shots, "seed": seed, "holdout_per_class": holdout_per_class, "percent": None,
              "from_list": None}
    return _make(manifest, method, labeled, holdout)


def _balanced_labeled_ids(labels: np.ndarray, classes: np.ndarray, percent: float, rng: np.random.Generator):
    per_class = max(1, round(percent / 100 * len(labels) / len(classes)))
    return np.concatenate([
        rng.choice(ids, size=min(per_class, len(ids)), replace=False)
        for ids in (np.flatnonzero(labels == c) for c in classes)
    ])


# ---- the reference's rule ---------------------------------------------------------------------------


def cascade_round(values: np.ndarray) -> np.ndarray:
    """The reference's rounding: keep a running sum of the values (the current one included); round a
    value up when the running sum's fractional part exceeds 0.5, else down."""
    running = 0.0
    rounded = []
    for value in values:
        running += value
        rounded.append(math.ceil(value) if running - running // 1 > 0.5 else math.floor(value))
    return np.asarray(rounded, dtype=np.int64)


def reference_class_counts(class_sizes, percent: float) -> np.ndarray:
    """Labeled images per class under the reference's rule, for classes of these sizes (label order).

    Start every class at N/C * p - 1, clipped to [1, class size]; cascade-round; while the total is
    below N * p, add 1/C to every class (repeated float additions, as the reference does) and round again.
    """
    sizes = np.asarray(class_sizes, dtype=np.int64)
    total, num_classes = int(sizes.sum()), len(sizes)
    fraction = percent / 100.0
    wanted = np.maximum(np.minimum(np.full(num_classes, total / num_classes * fraction) - 1.0, sizes), 1.0)
    counts = np.minimum(cascade_round(wanted), sizes)
    while counts.sum() < total * fraction:
        wanted = np.minimum(wanted + 1 / num_classes, sizes)
        counts = np.minimum(cascade_round(wanted), sizes)
    return counts


def _imagefolder_key(source: str) -> tuple[str, str, str]:
    """Where torchvision's ImageFolder puts a file `class/[sub/...]name`: by class folder, then by its
    directory as os.walk's sorted dirpaths order them (the class folder itself first), then by name."""
    folder, _, rest = source.partition("/")
    directory, _, name = rest.rpartition("/")
    return folder, "/" + directory if directory else "", name


def imagefolder_order(sources: list[str]) -> np.ndarray:
    """Indices of `sources` in torchvision ImageFolder order (plain string sorts, as it does them)."""
    return np.asarray(sorted(range(len(sources)), key=lambda i: _imagefolder_key(sources[i])), dtype=np.int64)


def reference_draw(sources: list[str], percent: float, seed: int) -> np.ndarray:
    """Indices of `sources` (file names `class/name`) that the reference's rule labels.

    Classes are the sorted class folders; the draw for class c is numpy's legacy
    `RandomState(seed).choice(positions, count_c, replace=False)`, classes in turn, one generator,
    positions counted in ImageFolder order over all the files."""
    order = imagefolder_order(sources)
    folders = [_imagefolder_key(sources[i])[0] for i in order]
    starts = [0] + [p for p in range(1, len(folders)) if folders[p] != folders[p - 1]] + [len(folders)]
    sizes = np.diff(starts)
    counts = reference_class_counts(sizes, percent)
    generator = np.random.RandomState(seed)  # the legacy generator that np.random.seed(13) seeds
    positions = [generator.choice(np.arange(starts[c], starts[c + 1]), int(counts[c]), replace=False)
                 for c in range(len(sizes))]
    return order[np.concatenate(positions)]


def manifest_sources(manifest: Manifest, why: str) -> list[str]:
    """Every sample's original file name, in manifest order; a sample without one is a one-line error."""
    sources = []
    for shard in manifest.shards:
        names = shard.sources or [None] * shard.num_samples
        for position, source in enumerate(names):
            if source is None or "/" not in source:
                state = "has no original file name" if source is None else f"has the file name {source!r}, outside a class folder"
                raise UserError(
                    f"shard {shard.name}, key {shard.keys[position]!r} {state}; {why} needs each image's "
                    "class/file name as `dho-pipeline shard` records it: rebuild the shards and manifest with "
                    "`dho-pipeline shard`, or draw with --rule balanced"
                )
        sources.extend(names)
    return sources


def reference_labeled_ids(manifest: Manifest, percent: float, seed: int) -> np.ndarray:
    """Global ids (manifest order) of the images the reference's rule labels."""
    return reference_draw(manifest_sources(manifest, "--rule reference"), percent, seed)


# ---- image lists ------------------------------------------------------------------------------------


def labeled_names(manifest: Manifest, split: Split) -> list[str]:
    """The labeled images' names, one per image, as `--from-list` reads them back: original file names
    (`class/name`) in ImageFolder order where the manifest records them, else keys in manifest order."""
    names, all_sources = [], True
    for shard, mask in zip(manifest.shards, split.labeled_mask(manifest)):
        for position in np.flatnonzero(mask):
            source = shard.sources[position] if shard.sources is not None else None
            names.append(source or shard.keys[position])
            all_sources = all_sources and source is not None
    if all_sources:
        names.sort(key=_imagefolder_key)
    # A list line is stripped, and skipped when it starts with '#' (prompts.read_lines): such names would not come back.
    bad = next((n for n in names if n != n.strip() or n.startswith("#") or any(ord(c) < 32 for c in n)), None)
    if bad is not None:
        raise UserError(f"image name {bad!r} cannot be written as a list line that --from-list reads back "
                        "(control character, surrounding space or leading '#')")
    return names


class _NameIndex:
    """Finds the sample a list names: an original file name (`class/name.JPEG`, `name.JPEG`, `name`, with
    or without leading folders or extension) or a key (`name`, `folder/name.ext`)."""

    def __init__(self, manifest: Manifest):
        self.by_stem: dict[str, list[int]] = {}  # stem of the original file name -> sample ids
        self.by_key: dict[str, list[int]] = {}  # key (its last path component) -> sample ids
        self.sources: list[str | None] = []
        for shard in manifest.shards:
            for position, key in enumerate(shard.keys):
                sample_id = len(self.sources)
                source = shard.sources[position] if shard.sources is not None else None
                self.sources.append(source)
                if source is not None:
                    self.by_stem.setdefault(_stem(source.rsplit("/", 1)[-1]), []).append(sample_id)
                self.by_key.setdefault(key.rsplit("/", 1)[-1], []).append(sample_id)

    def find(self, name: str) -> list[int]:
        from webdataset.tariterators import base_plus_ext

        from .shard_writer import safe_key

        parts = name.split("/")
        last = parts[-1]
        candidates = set(self.by_stem.get(_stem(last), [])) | set(self.by_stem.get(last, []))
        found = sorted(i for i in candidates if _names_match(parts, self.sources[i].split("/")))
        if found:
            return found
        found = self.by_key.get(base_plus_ext(last)[0] or last)
        if found:
            return found
        # Shards that `shard` wrote before it recorded file names: their keys are `<class folder>_<stem>`;
        # an ImageNet file name `n01440764_10026.JPEG` names its class folder itself.
        folder = parts[-2] if len(parts) > 1 else None
        if folder is None and re.match(r"n\d{8}_", last):
            folder = last.split("_", 1)[0]
        return self.by_key.get(safe_key(f"{folder}_{_stem(last)}"), []) if folder else []


def _stem(file_name: str) -> str:
    return os.path.splitext(file_name)[0]


def _names_match(query: list[str], source: list[str]) -> bool:
    """A listed name names a file when its last part is the file's name (with or without extension) and
    the folders before it agree with the file's, counted from the end, as far as both go."""
    if query[-1] not in (source[-1], _stem(source[-1])):
        return False
    depth = min(len(query), len(source)) - 1
    return depth == 0 or query[-1 - depth : -1] == source[-1 - depth : -1]


def _ids_from_list(manifest: Manifest, names: list[str], list_name: str) -> np.ndarray:
    """Global ids of the samples a list names (original file names or keys, e.g. n01440764_10026.JPEG)."""
    index = _NameIndex(manifest)
    ids, absent = [], []
    for name in names:
        found = index.find(name.strip())
        if not found:
            absent.append(name)
        elif len(found) > 1:
            raise UserError(f"{list_name}: {name!r} matches {len(found)} samples (give more of its path, e.g. its class folder)")
        else:
            ids.append(found[0])
    if absent:
        raise UserError(f"{list_name}: {len(absent)} of {len(names)} listed images are not in the manifest, e.g. {absent[0]!r}")
    if len(set(ids)) != len(ids):
        raise UserError(f"{list_name} names some images twice")
    return np.asarray(ids, dtype=np.int64)


def write_names(path: Path, names: list[str]) -> None:
    write_text_atomically(path, "".join(f"{name}\n" for name in names))


def save_split(split: Split, path: Path) -> None:
    document = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": split.fingerprint,
        "num_labeled": split.num_labeled,
        "num_holdout": split.num_holdout,
        "num_unlabeled": split.num_unlabeled,
        **_content(split.manifest_fingerprint, split.num_samples, split.method, split.labeled, split.holdout),
    }
    write_text_atomically(path, json.dumps(document) + "\n")


def load_split(path: str | Path) -> Split:
    path = Path(path)
    document = read_json(path, "split", "draw one with `dho-pipeline split`")
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise UserError(f"{path} is not a dho-pipeline split; draw one with `dho-pipeline split`")
    try:
        content = _content(
            document["manifest_fingerprint"], document["num_samples"], document["method"],
            document["labeled"], document["holdout"],
        )
    except KeyError as error:
        raise UserError(f"split {path} lacks {error}") from None
    if fingerprint_json(content) != document.get("fingerprint"):
        raise UserError(f"split {path} was edited after it was drawn; draw it again")
    for part in ("labeled", "holdout"):
        chosen = content[part]
        if not isinstance(chosen, dict) or not all(
            isinstance(name, str) and isinstance(positions, list) and all(_is_position(p) for p in positions)
            for name, positions in chosen.items()
        ):
            raise UserError(f"split {path}: '{part}' must map shard names to lists of positions; draw it again")
    if not _is_position(content["num_samples"]) or not isinstance(content["method"], dict):
        raise UserError(f"split {path} is malformed; draw it again")
    for name, positions in content["labeled"].items():  # held out means never trained on
        both = set(positions) & set(content["holdout"].get(name, []))
        if both:
            raise UserError(f"split {path}: sample {min(both)} of {name} is both labeled and held out; draw it again")
    return Split(fingerprint=document["fingerprint"], **content)


def _is_position(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
