"""Class subsets: evaluating a classifier on some of its classes (ImageNet-A and -R: 200 of ImageNet's 1000).

A subset is a file of WordNet ids (`n01440764`) or of class indices, one per line (`#` comments allowed),
or the name of one that ships with the package: `imagenet-a`, `imagenet-r` (manifests/subsets/, sorted
WordNet ids, identical to hendrycks' lists and timm's). WordNet ids need a 1000-class (ImageNet) student.

Both heads' logits are restricted to the subset's columns before the softmax and the mix, as is standard
for ImageNet-A and -R; the data's labels are indices of the student's classes (for ImageNet-A/R: shard
them with `--classes imagenet_wnids.txt`), and become positions in the subset.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

_WNID = re.compile(r"n\d{8}")


@dataclass(frozen=True)
class ClassSubset:
    name: str  # as given
    indices: tuple[int, ...]  # columns of the full classifier, in subset order

    def __len__(self) -> int:
        return len(self.indices)

    def positions(self, labels: np.ndarray, where=lambda i: f"sample {i}") -> np.ndarray:
        """Labels (full-classifier indices) as positions in the subset; a label outside it is refused."""
        lookup = np.full(max(max(self.indices), int(labels.max(initial=0))) + 1, -1, np.int64)
        lookup[list(self.indices)] = np.arange(len(self.indices))
        positions = lookup[labels] if len(labels) else np.zeros(0, np.int64)
        outside = np.flatnonzero(positions < 0)
        if len(outside):
            first = int(outside[0])
            raise UserError(
                f"{where(first)} has label {int(labels[first])}, which is not one of the {len(self)} classes of "
                f"{self.name} ({len(outside)} such samples); label the data with the student's class indices "
                "(for ImageNet-A/R: shard --classes imagenet_wnids.txt)"
            )
        return positions

    def restrict(self, logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Both heads' logits over the subset's columns only, labels as subset positions."""
        columns = torch.tensor(self.indices, dtype=torch.long)
        labels = logits["labels"].long().numpy()
        return {**logits, "ce": logits["ce"][:, columns], "kd": logits["kd"][:, columns],
                "labels": torch.from_numpy(self.positions(labels))}


def read_class_subset(spec: str | Path, num_classes: int) -> ClassSubset:
    """A shipped subset by name, or a file of WordNet ids or class indices, for a `num_classes` classifier."""
    from .package_data import IMAGENET_WNIDS, SUBSETS, shipped_file, shipped_names
    from .prompts import read_lines

    name = str(spec)
    path = Path(spec) if Path(spec).exists() else shipped_file(SUBSETS, name)
    if path is None:
        raise UserError(f"class subset {name} is neither a file nor one that ships with dho-pipeline "
                        f"({', '.join(shipped_names(SUBSETS))})")
    entries = read_lines(path, "class-subset")
    if all(_WNID.fullmatch(entry) for entry in entries):
        if num_classes != 1000:
            raise UserError(f"class subset {name} lists WordNet ids, which name ImageNet's 1000 classes; the student "
                            f"has {num_classes} classes: list class indices instead")
        index_of = {wnid: i for i, wnid in enumerate(read_lines(IMAGENET_WNIDS, "ImageNet wnids"))}
        unknown = [entry for entry in entries if entry not in index_of]
        if unknown:
            raise UserError(f"class subset {name}: {unknown[0]} is not one of ImageNet's 1000 WordNet ids")
        indices = [index_of[entry] for entry in entries]
    elif all(entry.isdigit() for entry in entries):
        indices = [int(entry) for entry in entries]
        beyond = [i for i in indices if i >= num_classes]
        if beyond:
            raise UserError(f"class subset {name}: class {beyond[0]} is beyond the student's {num_classes} classes")
    else:
        odd = next((e for e in entries if not (_WNID.fullmatch(e) or e.isdigit())), None)
        if odd is None:
            raise UserError(f"class subset {name} mixes WordNet ids and class indices; list one kind, one a line")
        raise UserError(f"class subset {name}: {odd!r} is neither a WordNet id (n01440764) nor a class index; "
                        "list one kind, one a line")
    if len(set(indices)) != len(indices):
        raise UserError(f"class subset {name} names a class twice")
    return ClassSubset(name=name, indices=tuple(indices))
