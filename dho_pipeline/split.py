"""Label splits: which samples of a manifest are labeled, which are held out, the rest unlabeled.

A split is drawn once (`dho-pipeline split`) and saved as JSON:

    {"format": "dho-pipeline-split", "version": 1,
     "fingerprint": "sha256:...",            # of the content below
     "manifest_fingerprint": "sha256:...",   # the manifest it indexes
     "num_samples": N,                       # in that manifest
     "method": {"percent": 1.0, "seed": 13, "holdout_per_class": 0, "from_list": null},
     "num_labeled": L, "num_holdout": H, "num_unlabeled": U,
     "labeled": {"shard-000000.tar": [positions in the shard], ...},
     "holdout": {"shard-000000.tar": [...], ...}}

Class-balanced drawing, as the DHO reference does it: every class gets the same number of labeled
images, `round(percent / 100 * num_samples / num_classes)` (ImageNet: 13 at 1%, 128 at 10%), drawn with
numpy's generator seeded by `seed`; classes with fewer images give all they have. The held-out set
(`holdout_per_class`, for calibrating alpha and beta) is drawn from the remaining images of each
class and is never trained on. Unlabeled = every sample neither labeled nor held out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .hashing import fingerprint_json
from .jsonfiles import read_json, write_text_atomically
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


def draw_split(manifest: Manifest, *, percent: float, seed: int, holdout_per_class: int = 0,
               from_list: list[str] | None = None, list_name: str | None = None) -> Split:
    labels = all_labels(manifest)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    method = {"percent": percent, "seed": seed, "holdout_per_class": holdout_per_class, "from_list": list_name}
    if from_list is not None:
        labeled_ids = _ids_from_list(manifest, from_list, list_name or "list")
        method["percent"] = None
    else:
        if not 0 < percent <= 100:
            raise UserError(f"--percent must lie in (0, 100], not {percent}")
        per_class = max(1, round(percent / 100 * len(labels) / len(classes)))
        labeled_ids = np.concatenate([
            rng.choice(ids, size=min(per_class, len(ids)), replace=False)
            for ids in (np.flatnonzero(labels == c) for c in classes)
        ])
    taken = np.zeros(len(labels), dtype=bool)
    taken[labeled_ids] = True
    holdout_ids = np.zeros(0, dtype=np.int64)
    if holdout_per_class > 0:
        holdout_ids = np.concatenate([
            rng.choice(ids, size=min(holdout_per_class, len(ids)), replace=False)
            for ids in (np.flatnonzero((labels == c) & ~taken) for c in classes)
        ])
        if len(holdout_ids) == 0:
            raise UserError(
                f"--holdout {holdout_per_class} asked, but the labeled draw took all {len(labeled_ids)} of the "
                f"{len(labels)} images, leaving none to hold out; lower --percent (or shorten --from-list) so that "
                f"{holdout_per_class} per class remain"
            )
    return _make(manifest, method, labeled_ids, holdout_ids)


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


def _ids_from_list(manifest: Manifest, names: list[str], list_name: str) -> np.ndarray:
    """Global ids of the samples a list names (image file names or keys, e.g. n01440764_10026.JPEG)."""
    from webdataset.tariterators import base_plus_ext

    where: dict[str, list[int]] = {}
    sample_id = 0
    for shard in manifest.shards:
        for key in shard.keys:
            where.setdefault(key.rsplit("/", 1)[-1], []).append(sample_id)
            sample_id += 1
    ids, absent = [], []
    for name in names:
        base = name.strip().rsplit("/", 1)[-1]
        key = base_plus_ext(base)[0] or base
        found = where.get(key)
        if not found:
            absent.append(name)
        elif len(found) > 1:
            raise UserError(f"{list_name}: {name!r} matches {len(found)} samples (the key is not unique across shards)")
        else:
            ids.append(found[0])
    if absent:
        raise UserError(f"{list_name}: {len(absent)} of {len(names)} listed images are not in the manifest, e.g. {absent[0]!r}")
    if len(set(ids)) != len(ids):
        raise UserError(f"{list_name} names some images twice")
    return np.asarray(ids, dtype=np.int64)


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
