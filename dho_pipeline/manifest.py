"""Dataset manifests: which shards make the data set, and what each holds.

A manifest is a JSON file written by `dho-pipeline manifest`. Every later stage reads it, and the
teacher cache and the label splits record its fingerprint, so a run can tell when it is pointed at
data other than the data its cache was built from.

Format (version 1), one object:

    {"format": "dho-pipeline-manifest", "version": 1,
     "fingerprint": "sha256:...",          # of everything below except the paths
     "num_shards": S, "num_samples": N,
     "classnames": ["golden retriever", ...],  # only when the shards come with class names (see below)
     "shards": [{"name": "shard-000000.tar",  # basename, unique within the manifest
                 "path": "shards/shard-000000.tar",  # relative to the manifest's folder, or absolute
                 "num_samples": n, "size": bytes, "fingerprint": "sha256:...",
                 "keys": [...],                 # in tar order
                 "labels": [...] or null,       # int class index per sample (null where absent)
                 "image_ext": "jpeg" or [...],  # one extension, or one per sample when mixed
                 "image_offsets": [...], "image_sizes": [...]},  # where each image's bytes lie
                ...]}

Paths are left out of the fingerprint so that moving the shards (and editing their paths) keeps
caches and splits valid; anything else edited by hand makes the manifest refuse to load.

Class names: when a `classes.txt` (or `classnames.txt`) lies beside the shards (`dho-pipeline shard`
writes one: line i names class i), the manifest records its names, and `cache-teacher` and `train` use
them when given no `--classnames`. Several shard folders must agree; labels must lie within the list.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .hashing import fingerprint_json
from .jsonfiles import read_json, write_text_atomically
from .shards import ShardScan

FORMAT = "dho-pipeline-manifest"
VERSION = 1


@dataclass(frozen=True, kw_only=True)
class ShardEntry:
    """One shard of a manifest. Per-sample lists are in tar order."""

    name: str
    path: Path  # resolved: absolute, or relative to the working directory
    num_samples: int
    size: int
    fingerprint: str
    keys: list[str]
    labels: list[int | None] | None
    image_ext: str | list[str]
    image_offsets: list[int]
    image_sizes: list[int]

    def content(self) -> dict:
        """Everything that identifies the shard's content (not where it lies)."""
        return {
            "name": self.name,
            "num_samples": self.num_samples,
            "size": self.size,
            "fingerprint": self.fingerprint,
            "keys": self.keys,
            "labels": self.labels,
            "image_ext": self.image_ext,
            "image_offsets": self.image_offsets,
            "image_sizes": self.image_sizes,
        }


CLASS_NAME_FILES = ("classes.txt", "classnames.txt")  # beside the shards; the first found is used


@dataclass(frozen=True)
class Manifest:
    shards: list[ShardEntry]
    fingerprint: str
    classnames: list[str] | None = None  # from the shards' folder (classes.txt), if there was one

    @property
    def num_samples(self) -> int:
        return sum(shard.num_samples for shard in self.shards)

    def check_files(self) -> None:
        """Every shard exists with the size it had when scanned. Cheap: one stat per shard."""
        for shard in self.shards:
            try:
                size = os.path.getsize(shard.path)
            except OSError:
                raise UserError(
                    f"shard {shard.name} is missing: {shard.path} does not exist "
                    "(restore it, or rebuild the manifest without it)"
                ) from None
            if size != shard.size:
                raise UserError(
                    f"shard {shard.name} changed since the manifest was built ({shard.path} has "
                    f"{size} bytes, the manifest says {shard.size}); rebuild the manifest"
                )

    def check_labels(self, num_classes: int, *, required: bool = False) -> None:
        """Labels lie in [0, num_classes); with `required`, every sample has one."""
        for shard in self.shards:
            labels = shard.labels or [None] * shard.num_samples
            for key, label in zip(shard.keys, labels):
                if label is None:
                    if required:
                        raise UserError(
                            f"shard {shard.name}, key {key!r} has no label (.cls or .json 'label'); "
                            "labels are needed here"
                        )
                elif not 0 <= label < num_classes:
                    raise UserError(
                        f"shard {shard.name}, key {key!r}: label {label} is outside the class list "
                        f"(0..{num_classes - 1}); check the class-names file or the shard's labels"
                    )

    def check_class_count(self, num_classes: int, source: str, *, given: bool, allow_unused: bool = False) -> str | None:
        """Labels inside the class list; a list longer than the labels imply (ImageNet's 1000 names for a
        5-class data set make a 1000-way teacher) is refused when it was not `given` (a default) unless
        `allow_unused`, and is a warning (returned) when the user named the file."""
        self.check_labels(num_classes)
        implied = self.label_range()
        if implied is None or num_classes <= implied or allow_unused:
            return None
        numbers = f"the class list ({source}) has {num_classes} names but the labels run 0..{implied - 1} ({implied} classes)"
        if given:
            return f"{numbers}: classes {implied}..{num_classes - 1} have no labeled sample; is it the right file?"
        raise UserError(
            f"{numbers}; pass the data set's own class names (--classnames FILE; `dho-pipeline shard` writes "
            "classes.txt beside the shards), or --allow-unused-classes if no sample is labeled with the last ones"
        )

    def label_range(self) -> int | None:
        """1 + the largest label (None when no sample is labeled): how many classes the labels imply."""
        largest = max((label for shard in self.shards for label in (shard.labels or []) if label is not None), default=None)
        return None if largest is None else largest + 1


def scan_manifest(patterns: list[str], workers: int = 4, progress: bool = True) -> Manifest:
    """Scan shards (paths, brace patterns, globs) into a manifest, several shards at a time.

    Threads suffice: reading and hashing release the GIL.
    """
    from concurrent.futures import ThreadPoolExecutor

    from .progress import progress as bar
    from .shards import expand_shard_patterns, scan_shard

    paths = expand_shard_patterns(list(patterns))
    if not paths:
        raise UserError("no shards given")
    absent = [p for p in paths if not p.is_file()]
    if absent:
        more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
        state = "is a directory, not a tar file" if absent[0].is_dir() else "does not exist"
        raise UserError(f"shard {absent[0]} {state}{more}")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        scans = list(bar(pool.map(scan_shard, paths), total=len(paths), unit="shard", desc="manifest", show=progress))
    entries = [entry_from_scan(path, scan) for path, scan in zip(paths, scans)]
    classnames, source = classnames_beside(paths)
    manifest = build_manifest(entries, classnames)
    if classnames is not None:
        try:
            manifest.check_labels(len(classnames))
        except UserError as error:
            raise UserError(f"{source} does not fit the shards: {error}") from None
    return manifest


def classnames_beside(paths: list[Path]) -> tuple[list[str] | None, Path | None]:
    """The class names in a classes.txt (or classnames.txt) in the shards' folder(s), and that file.
    Folders that hold one must agree; none at all: (None, None)."""
    from .prompts import read_classnames

    found: dict[Path, list[str]] = {}
    for folder in dict.fromkeys(p.parent for p in paths):
        for name in CLASS_NAME_FILES:
            if (folder / name).is_file():
                found[folder / name] = read_classnames(folder / name)
                break
    if not found:
        return None, None
    (first, names), *others = found.items()
    for other, other_names in others:
        if other_names != names:
            raise UserError(f"the shards' class-name files {first} and {other} differ; keep one list for the data set")
    return names, first


def manifest_for_data(data: list[str], workers: int = 4) -> Manifest:
    """`--data`: one manifest file (.json), or shards to scan on the fly."""
    if len(data) == 1 and data[0].endswith(".json"):
        return load_manifest(data[0])
    return scan_manifest(data, workers, progress=False)


def entry_from_scan(path: Path, scan: ShardScan) -> ShardEntry:
    has_labels = any(label is not None for label in scan.labels)
    exts = set(scan.image_exts)
    return ShardEntry(
        name=path.name,
        path=path,
        num_samples=len(scan.keys),
        size=scan.size,
        fingerprint=scan.fingerprint,
        keys=scan.keys,
        labels=scan.labels if has_labels else None,
        image_ext=scan.image_exts[0] if len(exts) == 1 else scan.image_exts,
        image_offsets=scan.image_offsets,
        image_sizes=scan.image_sizes,
    )


def build_manifest(entries: list[ShardEntry], classnames: list[str] | None = None) -> Manifest:
    names: dict[str, Path] = {}
    for entry in entries:
        if entry.name in names:
            raise UserError(
                f"two shards share the file name {entry.name} ({names[entry.name]} and {entry.path}); "
                "shard names must be unique within a manifest"
            )
        names[entry.name] = entry.path
    return Manifest(shards=entries, fingerprint=_fingerprint(entries, classnames), classnames=classnames)


def _fingerprint(entries: list[ShardEntry], classnames: list[str] | None = None) -> str:
    content = [entry.content() for entry in entries]
    # Without class names the fingerprint is what it always was (older manifests stay valid).
    return fingerprint_json(content if classnames is None else {"shards": content, "classnames": classnames})


def _stored_path(shard_path: Path, manifest_dir: Path) -> str:
    absolute = shard_path.resolve()
    try:
        return str(absolute.relative_to(manifest_dir.resolve()))
    except ValueError:
        return str(absolute)


def save_manifest(manifest: Manifest, path: Path) -> None:
    """Write atomically; one shard per line so that the file diffs and greps well."""
    header = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": manifest.fingerprint,
        "num_shards": len(manifest.shards),
        "num_samples": manifest.num_samples,
    }
    lines = [
        json.dumps({"path": _stored_path(entry.path, path.parent), **entry.content()}, ensure_ascii=False)
        for entry in manifest.shards
    ]
    names = "" if manifest.classnames is None else f',\n "classnames": {json.dumps(manifest.classnames, ensure_ascii=False)}'
    write_text_atomically(path, json.dumps(header, indent=1)[:-2] + names + ',\n "shards": [\n' + ",\n".join(lines) + "\n]}\n")


def load_manifest(path: str | Path) -> Manifest:
    """Read and check a manifest; any fault is a one-line UserError naming the file."""
    path = Path(path)
    document = read_json(path, "manifest", "build it with `dho-pipeline manifest`")
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise UserError(f"{path} is not a dho-pipeline manifest; create one with `dho-pipeline manifest`")
    if document.get("version") != VERSION:
        raise UserError(f"manifest {path} has version {document.get('version')!r}; this tool reads version {VERSION}")
    shards = document.get("shards")
    if not isinstance(shards, list) or not shards:
        raise UserError(f"manifest {path} lists no shards")
    entries = [_parse_entry(path, index, raw) for index, raw in enumerate(shards)]
    classnames = document.get("classnames")
    if classnames is not None and not (isinstance(classnames, list) and classnames
                                       and all(isinstance(n, str) and n.strip() for n in classnames)):
        raise UserError(f"manifest {path}: 'classnames' must be a list of non-empty strings; rebuild the manifest")
    manifest = build_manifest(entries, classnames)
    if manifest.fingerprint != document.get("fingerprint"):
        raise UserError(
            f"manifest {path} was edited after it was built (its content no longer matches its "
            "fingerprint); rebuild it with `dho-pipeline manifest` (only paths may be edited)"
        )
    return manifest


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_entry(path: Path, index: int, raw: object) -> ShardEntry:
    """One shard's record, every field checked for type and length (a hand-edited file must not crash)."""
    where = f"manifest {path}, shard #{index}"
    if not isinstance(raw, dict):
        raise UserError(f"{where} is not an object")
    missing = [k for k in ("name", "path", "num_samples", "size", "fingerprint", "keys", "labels", "image_ext",
                           "image_offsets", "image_sizes") if k not in raw]
    if missing:
        raise UserError(f"{where} lacks the field '{missing[0]}'; rebuild the manifest")
    count = raw["num_samples"]
    problems = [
        ("name", isinstance(raw["name"], str) and raw["name"] != "" and "/" not in raw["name"], "a file name"),
        ("path", isinstance(raw["path"], str) and raw["path"] != "", "a path"),
        ("num_samples", _is_int(count) and count >= 1, "a positive integer"),
        ("size", _is_int(raw["size"]) and raw["size"] >= 0, "a byte count"),
        ("fingerprint", isinstance(raw["fingerprint"], str), "a string"),
    ]
    for field_name, ok, expected in problems:
        if not ok:
            raise UserError(f"{where}: '{field_name}' must be {expected}; rebuild the manifest")

    def per_sample(field_name: str, item_ok, expected: str, optional: bool = False) -> None:
        values = raw[field_name]
        if optional and values is None:
            return
        if not isinstance(values, list) or len(values) != count or not all(item_ok(v) for v in values):
            raise UserError(f"{where}: '{field_name}' must be a list of {count} {expected}; rebuild the manifest")

    per_sample("keys", lambda v: isinstance(v, str) and v != "", "non-empty strings")
    per_sample("labels", lambda v: v is None or _is_int(v), "integers (or null)", optional=True)  # ranges: check_labels
    per_sample("image_offsets", lambda v: _is_int(v) and v >= 0, "byte offsets")
    per_sample("image_sizes", lambda v: _is_int(v) and v >= 0, "byte counts")
    if not isinstance(raw["image_ext"], str):
        per_sample("image_ext", lambda v: isinstance(v, str), "extensions")
    return ShardEntry(
        name=raw["name"], path=_resolve(path.parent, raw["path"]), num_samples=count, size=raw["size"],
        fingerprint=raw["fingerprint"], keys=raw["keys"], labels=raw["labels"], image_ext=raw["image_ext"],
        image_offsets=raw["image_offsets"], image_sizes=raw["image_sizes"],
    )


def _resolve(manifest_dir: Path, stored: str) -> Path:
    stored_path = Path(stored)
    return stored_path if stored_path.is_absolute() else manifest_dir / stored_path
