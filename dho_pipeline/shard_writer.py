"""Writing WebDataset shards: from an ImageNet-style class-folder tree, or from images in memory.

Shards are written with webdataset's own ShardWriter. Each sample holds one image member (its
original bytes and extension), a `.cls` label and, for images read from a folder tree, a `.source.txt`
member with the image's file name relative to the tree (`n01440764/n01440764_10026.JPEG`): the manifest
keeps it, so that a split can reproduce an ImageFolder-ordered draw and name images as their lists do. Keys are made safe (letters, digits, `_` and `-`
only: no dots, which WebDataset treats as extension separators, no slashes, no control characters)
and unique. Sample order is a seeded shuffle of the sorted file list: deterministic, and mixed, so that
a streaming reader's shuffle buffer sees many classes at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from .errors import UserError
from .shards import IMAGE_EXTENSIONS, SOURCE_EXT

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class SampleSource:
    key: str
    ext: str  # image member extension, lower-case
    label: int
    path: Path | None = None  # read from disk when written ...
    data: bytes | None = None  # ... or given in memory
    source: str | None = None  # file name relative to the folder tree, "/"-separated (None: not from a tree)

    def image_bytes(self) -> bytes:
        return self.data if self.data is not None else self.path.read_bytes()


def safe_key(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("_") or "sample"


def unique_keys(names: list[str]) -> list[str]:
    """Safe keys, with `-2`, `-3`, ... appended where two names map to the same key."""
    seen: dict[str, int] = {}
    keys = []
    for name in names:
        key = safe_key(name)
        seen[key] = seen.get(key, 0) + 1
        keys.append(key if seen[key] == 1 else f"{key}-{seen[key]}")
    return keys


def folder_samples(root: Path, class_list: list[str] | None = None) -> tuple[list[SampleSource], list[str], int]:
    """Samples of `root/<class>/<image>`: (samples, class folder names in label order, files skipped).

    Class order: `class_list` (folder names, in label order) if given, else sorted folder names; folders
    all named by numbers (ImageNet-V2: 0..999) are labeled by their number, never sorted as strings.
    """
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; expected ROOT/<class>/<image> files")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not folders:
        raise UserError(f"{root} has no class folders; expected ROOT/<class>/<image> files")
    classes = class_list if class_list is not None else numbered_classes(folders) or folders
    label_of = {name: index for index, name in enumerate(classes)}
    unknown = [name for name in folders if name not in label_of]
    if unknown:
        raise UserError(f"folder {root / unknown[0]} is not in the class list ({len(unknown)} such folder(s))")
    files, skipped = [], 0
    for name in folders:
        for path in sorted((root / name).rglob("*")):
            if not path.is_file():
                continue
            ext = path.suffix.lower().lstrip(".")
            if ext in IMAGE_EXTENSIONS:
                files.append((path, ext, label_of[name], f"{name}_{path.relative_to(root / name).with_suffix('')}"))
            else:
                skipped += 1
    if not files:
        raise UserError(f"{root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    keys = unique_keys([name for *_, name in files])
    samples = [SampleSource(key=k, ext=ext, label=label, path=path, source=_source_name(root, path))
               for k, (path, ext, label, _) in zip(keys, files)]
    return samples, list(classes), skipped


def numbered_classes(folders: list[str]) -> list[str] | None:
    """Folders named 0, 1, 2, ... (ImageNet-V2) are their own labels: the class list 0..max, or None if
    some folder is not a plain number."""
    if not all(name.isascii() and name.isdigit() and str(int(name)) == name for name in folders):
        return None  # zero-padded numbers sort as strings already
    return [str(label) for label in range(max(int(name) for name in folders) + 1)]


def _source_name(root: Path, path: Path) -> str | None:
    """The file name relative to the tree; None when it is not one line of UTF-8 text (a list names an image
    per line, and the tar member holds UTF-8)."""
    name = path.relative_to(root).as_posix()
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return None if "\n" in name or "\r" in name else name


def class_names_of_folders(folders: list[str]) -> list[str]:
    """Class names for CLIP prompts from class folder names: underscores as spaces; ImageNet's WordNet
    ids (n01440764, ...) as CLIP's ImageNet class names."""
    from .package_data import IMAGENET_CLASSNAMES, IMAGENET_WNIDS
    from .prompts import read_lines

    wnids = read_lines(IMAGENET_WNIDS, "WordNet-id")
    if set(folders) <= set(wnids):
        names = dict(zip(wnids, read_lines(IMAGENET_CLASSNAMES, "class-names")))
        return [names[folder] for folder in folders]
    return [" ".join(folder.replace("_", " ").split()) or folder for folder in folders]


def write_class_names(folders: list[str], where: Path) -> tuple[Path | None, str | None]:
    """`where/classes.txt` (line i: class i's name, see class_names_of_folders), or why it was not written:
    a name a class-names file cannot hold (it would be read back as a comment, a blank or two lines)."""
    import unicodedata

    from .jsonfiles import write_text_atomically

    names = class_names_of_folders(folders)
    for folder, name in zip(folders, names):
        if not name.strip() or name.lstrip().startswith("#") or any(unicodedata.category(c) == "Cc" for c in name):
            return None, f"class folder {folder!r} cannot be written as a line of a class-names file"
    path = where / "classes.txt"
    write_text_atomically(path, "\n".join(names) + "\n")
    return path, None


def shuffled(samples: list[SampleSource], seed: int) -> list[SampleSource]:
    order = np.random.default_rng(seed).permutation(len(samples))
    return [samples[i] for i in order]


_CONVERSION = re.compile(r"(%%|%[-+ #0-9.]*[a-zA-Z])")


def check_pattern(pattern: str) -> None:
    """A shard path pattern holds exactly one number placeholder (%d, %06d); a literal % is written %%."""
    try:
        names = {pattern % number for number in (0, 1)}
    except (TypeError, ValueError):
        names = set()
    if len(names) != 2 or [t for t in _CONVERSION.findall(pattern) if t != "%%"] == []:
        raise UserError(f"--out {pattern!r} must hold exactly one shard-number placeholder such as %06d (write a "
                        "literal % as %%), e.g. out/train-%06d.tar")


def existing_shards(pattern: str) -> list[Path]:
    """Files that the pattern names for some shard number, sorted."""
    import glob

    parts = _CONVERSION.split(pattern)  # text, token, text, ...
    wildcard = "".join("%" if p == "%%" else "*" if i % 2 else glob.escape(p) for i, p in enumerate(parts))
    exact = re.compile("".join("%" if p == "%%" else r"\d+" if i % 2 else re.escape(p) for i, p in enumerate(parts)))
    return sorted(Path(name) for name in glob.glob(wildcard) if exact.fullmatch(name) and Path(name).is_file())


def claim_shard_folder(pattern: str, overwrite: bool) -> None:
    """Refuse to write among shards of an earlier run (a later glob would mix them in); with
    `overwrite`, remove them first."""
    check_pattern(pattern)
    found = existing_shards(pattern)
    if found and not overwrite:
        raise UserError(f"{len(found)} shard(s) named by --out {pattern!r} exist already (e.g. {found[0]}); pass "
                        "--overwrite to remove them and write anew, or choose another --out")
    for path in found:
        path.unlink()


def write_shards(samples: Iterable[SampleSource], pattern: str, *, maxcount: int, maxsize: float) -> list[Path]:
    """Write samples in order through webdataset's ShardWriter; returns the shard paths written.

    A shard appears under its final name only once whole, so an interrupted run leaves no
    half-written shard that looks finished; rerunning rewrites the same shards.
    """
    import webdataset as wds

    check_pattern(pattern)
    Path(pattern % 0).parent.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def publish(partial_name: str) -> None:
        # Each shard is written under a ".partial" name and renamed once whole.
        final = Path(partial_name[: -len(".partial")])
        Path(partial_name).replace(final)
        written.append(final)

    # mtime=0: the same samples always make byte-identical shards (same fingerprints, same caches).
    with wds.ShardWriter(pattern + ".partial", maxcount=maxcount, maxsize=maxsize, verbose=0, post=publish, mtime=0) as writer:
        for sample in samples:
            record = {"__key__": sample.key, sample.ext: sample.image_bytes(), "cls": sample.label}
            if sample.source is not None:
                record[SOURCE_EXT] = sample.source.encode("utf-8")
            writer.write(record)
    return written
