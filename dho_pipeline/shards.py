"""WebDataset tar shards: expanding shard lists, scanning a shard without decoding, reading samples.

A sample is the group of tar members that share a key, exactly as WebDataset groups them: the key is
the member path up to the first dot of its basename, the extension (lower-cased) names the field.
`scan_shard` reads a shard once, start to end, and records what the manifest needs (keys, labels,
where each image's bytes lie, and each image's original file name where a `.source.txt` member gives
it) while fingerprinting the file in the same pass.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from braceexpand import braceexpand
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from .errors import UserError
from .hashing import HashingReader, sampled_fingerprint

# Image member extensions, in the order we prefer them when a sample has more than one.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Magic bytes of compressed tars. tarfile would read them, but every later stage reads images at
# byte offsets into the file, which only an uncompressed tar has.
_COMPRESSION_MAGIC = {
    b"\x1f\x8b": ("gzip", "gunzip -k"),
    b"BZh": ("bzip2", "bunzip2 -k"),
    b"\xfd7zXZ\x00": ("xz", "unxz -k"),
    b"\x28\xb5\x2f\xfd": ("zstd", "unzstd"),
    b"\x04\x22\x4d\x18": ("lz4", "unlz4"),
}
# WebDataset skips members named like __meta__; so do we, so that our keys match its keys.
_WDS_META = re.compile(r"__[^/]*__($|/)")
# The member holding an image's original file name, relative to its folder tree (written by `shard`).
SOURCE_EXT = "source.txt"


def expand_shard_patterns(patterns: list[str]) -> list[Path]:
    """Expand brace patterns (`data/shard-{000..099}.tar`) and globs into a list of paths, in order.

    A pattern that matches nothing is an error, so a typo never silently drops data.
    """
    paths: list[Path] = []
    for pattern in patterns:
        for expanded in braceexpand(pattern):
            if glob.has_magic(expanded):
                matches = sorted(glob.glob(expanded))
                if not matches:
                    raise UserError(f"no shard matches {expanded!r}: check the pattern")
                paths.extend(Path(m) for m in matches)
            else:
                paths.append(Path(expanded))
    return paths


@dataclass(frozen=True, kw_only=True)
class ShardScan:
    """What one pass over a shard found. Lists are in tar order, one entry per sample."""

    size: int
    fingerprint: str
    keys: list[str]
    labels: list[int | None]
    image_exts: list[str]
    image_offsets: list[int]  # byte offset of the image member's data inside the tar
    image_sizes: list[int]  # byte length of the image member
    sources: list[str | None]  # original file name (a .source.txt member), None where the sample has none
    sampled_fingerprint: str  # hashing.sampled_fingerprint: the cheap "still the same file" check


def _parse_label(shard: str, key: str, ext: str, data: bytes) -> int | None:
    """The label a `.cls` member holds (an integer), or a `.json` member's top-level integer "label" field;
    a .json without a top-level "label" is other metadata (a caption, say) and holds no label."""
    try:
        if ext == "cls":
            return int(data.decode("utf-8").strip())
        value = json.loads(data.decode("utf-8"))
        if not isinstance(value, dict) or "label" not in value:
            return None
        label = value["label"]
        if isinstance(label, bool) or not isinstance(label, int):
            raise ValueError(f'its top-level "label" is {json.dumps(label)[:40]}, not an integer')
        return label
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(
            f"shard {shard}, key {key!r}: cannot read a label from its .{ext} member ({error}); expected an "
            'integer class index (.cls), or a JSON object whose top-level "label" is one (.json)'
        ) from None


def _parse_source(shard: str, key: str, data: bytes) -> str:
    try:
        source = data.decode("utf-8")
    except UnicodeDecodeError:
        source = ""
    if not source or "\n" in source or "\r" in source:
        raise UserError(
            f"shard {shard}, key {key!r}: its .{SOURCE_EXT} member is not a one-line UTF-8 file name; "
            "rebuild the shard, or remove the member"
        )
    return source
def is_macos_metadata(member_name: str) -> bool:
    """macOS litter in tars made on a Mac: AppleDouble `._name` files and `.DS_Store`."""
    base = member_name.rsplit("/", 1)[-1]
    return base.startswith("._") or base == ".DS_Store"


def scan_shard(path: Path) -> ShardScan:
    """Read a shard once: keys, labels, image locations, and the file's sha256. No image decoding."""
    name = str(path)
    keys: list[str] = []
    labels: list[int | None] = []
    exts: list[str] = []
    offsets: list[int] = []
    sizes: list[int] = []
    sources: list[str | None] = []
    seen: set[str] = set()
    skipped: list[str] = []  # macOS metadata members
    current: dict | None = None

    def close_sample(sample: dict | None) -> None:
        if sample is None:
            return
        key = sample["key"]
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(f"shard {name}: member name {key!r} is not UTF-8; rename it (keys must be UTF-8 text)") from None
        if key in seen:
            raise UserError(f"shard {name}: key {key!r} occurs twice; keys must be unique within a shard")
        seen.add(key)
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample["members"]), None)
        if image_ext is None:
            found = ", ".join(sorted(sample["members"])) or "nothing"
            raise UserError(
                f"shard {name}, key {key!r}: no image member (found {found}; "
                f"expected one of {', '.join(IMAGE_EXTENSIONS)})"
            )
        offset, size = sample["members"][image_ext]
        keys.append(key)
        labels.append(sample["label"])
        exts.append(image_ext)
        offsets.append(offset)
        sizes.append(size)
        sources.append(sample["source"])

    _refuse_compressed(path)
    try:
        with open(path, "rb") as raw:
            reader = HashingReader(raw)
            with tarfile.open(fileobj=reader, mode="r|*") as archive:
                for member in archive:
                    if not member.isreg() or _WDS_META.match(member.name):
                        continue
                    if is_macos_metadata(member.name):
                        skipped.append(member.name)
                        continue
                    key, ext = base_plus_ext(member.name)
                    if key is None:
                        continue
                    ext = ext.lower()
                    if current is None or current["key"] != key:
                        close_sample(current)
                        current = {"key": key, "members": {}, "label": None, "source": None}
                    if ext in current["members"]:
                        raise UserError(f"shard {name}, key {key!r}: member .{ext} occurs twice")
                    current["members"][ext] = (member.offset_data, member.size)
                    if ext in ("cls", "json"):
                        label = _parse_label(name, key, ext, archive.extractfile(member).read())
                        if label is not None and current["label"] not in (None, label):
                            raise UserError(
                                f"shard {name}, key {key!r}: its .cls and .json labels disagree ({current['label']} "
                                f"and {label}, in tar order); make them agree")
                        current["label"] = label if label is not None else current["label"]
                    elif ext == SOURCE_EXT:
                        current["source"] = _parse_source(name, key, archive.extractfile(member).read())
                close_sample(current)
                end_of_members = archive.offset
            fingerprint = reader.finish()
            size = os.fstat(raw.fileno()).st_size
            sampled = sampled_fingerprint(raw, size)
        _check_end_marker(path, end_of_members)
    except FileNotFoundError:
        raise UserError(f"shard {name} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"shard {name} is a directory, not a tar file") from None
    except (tarfile.TarError, EOFError) as error:
        raise UserError(
            f"shard {name} is truncated or not a valid tar file ({error}); re-copy or rebuild it"
        ) from None
    if not keys:
        raise UserError(f"shard {name} holds no samples; remove it from the shard list")
    if skipped:
        logging.getLogger("dho_pipeline").warning(
            "warning: shard %s: skipped %d macOS metadata member(s) (AppleDouble ._ files, .DS_Store), e.g. %r",
            name, len(skipped), skipped[0])
    return ShardScan(
        size=size,
        fingerprint=fingerprint,
        keys=keys,
        labels=labels,
        image_exts=exts,
        image_offsets=offsets,
        image_sizes=sizes,
        sources=sources,
        sampled_fingerprint=sampled,
    )


def _refuse_compressed(path: Path) -> None:
    try:
        with open(path, "rb") as stream:
            head = stream.read(8)
    except (FileNotFoundError, IsADirectoryError):
        return  # scan_shard reports these
    for magic, (kind, command) in _COMPRESSION_MAGIC.items():
        if head.startswith(magic):
            raise UserError(
                f"shard {path} is a compressed tar ({kind}); images are read at byte offsets, which needs an "
                f"uncompressed tar: decompress it (e.g. `{command} {path}`) and list the .tar instead"
            )


def _check_end_marker(path: Path, offset: int) -> None:
    """A tar ends with two zero blocks. In stream mode tarfile takes a file cut off exactly between
    members for a complete archive; this catches that (a partial copy, often block-aligned)."""
    with open(path, "rb") as stream:
        stream.seek(offset)
        marker = stream.read(1024)
    if len(marker) < 1024 or marker.count(0) != 1024:
        raise UserError(f"shard {path} is truncated (no end-of-archive marker after its last member); re-copy it")


def iter_shard_samples(path: Path, stream=None) -> Iterator[dict]:
    """Yield a shard's samples as WebDataset does (`__key__` plus one bytes field per extension).

    `stream`: read from it instead of opening `path` (e.g. a hashing.HashingReader, to fingerprint
    the shard in the same pass). Tar errors propagate (a truncated shard raises); callers decide how
    to report them.
    """
    if stream is None:
        with open(path, "rb") as opened:
            yield from iter_shard_samples(path, opened)
        return
    files = tar_file_expander([{"url": str(path), "stream": stream}], eof_value=None)
    yield from group_by_keys(f for f in files if not is_macos_metadata(f["fname"]))


def image_field(sample: dict) -> str | None:
    """The field holding a sample's image, by the same preference the manifest uses."""
    return next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
