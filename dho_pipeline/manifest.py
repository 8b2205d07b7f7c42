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
                 "image_offsets": [...], "image_sizes": [...],  # where each image's bytes lie
                 "sources": [...],  # optional: each image's original file name, or null
                 "sampled_fingerprint": "sha256:..."},  # of 16 blocks of 4 KiB (hashing.sampled_fingerprint)
                ...]}

`sources` holds, per sample, the image's file name relative to the folder tree it came from
(`n01440764/n01440764_10026.JPEG`), read from the `.source.txt` member that `dho-pipeline shard` writes;
a shard none of whose samples has one (shards made by other tools) has no `sources` field. Splits use
it to draw the reference's ImageFolder-ordered subset and to match image lists by file name.

Paths are left out of the fingerprint so that moving the shards (and editing their paths, or
`dho-pipeline manifest NEW/*.tar --relocate M.json`) keeps caches and splits valid; anything else
edited by hand makes the manifest refuse to load. `sampled_fingerprint` is left out too: it is a
check derived from the bytes the sha256 already identifies (manifests written before it existed lack
it and are checked by size alone).

Before any stage reads a shard, `check_files` checks each file is still the one scanned: "quick" (the
default; size and the sampled fingerprint, at most 64 KiB read per shard) or "full" (the sha256 of
every byte). Stage one also hashes every shard whole as it reads it.

Class names: when a `classes.txt` (or `classnames.txt`) lies beside the shards (`dho-pipeline shard`
writes one: line i names class i), the manifest records its names, and `cache-teacher` and `train` use
them when given no `--classnames`. Several shard folders must agree; labels must lie within the list.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .hashing import FILE_CHECKS, fingerprint_json, fingerprint_stream, sampled_fingerprint
from .jsonfiles import read_json, write_text_atomically
from .shards import ShardScan

FORMAT = "dho-pipeline-manifest"
VERSION = 1

log = logging.getLogger(__name__)


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
    sources: list[str | None] | None = None  # original file names (None: the shard records none)
    sampled_fingerprint: str | None = None  # None in manifests written before it was recorded

    def content(self) -> dict:
        """Everything that identifies the shard's content (not where it lies)."""
        content = {
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
        # Only where present, so that manifests written before the field existed keep their fingerprint.
        if self.sources is not None:
            content["sources"] = self.sources
        return content


CLASS_NAME_FILES = ("classes.txt", "classnames.txt")  # beside the shards; the first found is used


@dataclass(frozen=True)
class Manifest:
    shards: list[ShardEntry]
    fingerprint: str
    source: Path | None = field(default=None, compare=False)  # the file it was loaded from, if any
    classnames: list[str] | None = None  # from the shards' folder (classes.txt), if there was one

    @property
    def num_samples(self) -> int:
        return sum(shard.num_samples for shard in self.shards)

    def check_files(self, level: str = "quick") -> None:
        """Every shard is still the file that was scanned: "quick" compares its size and sampled
        fingerprint (at most 64 KiB read per shard), "full" its sha256 (every byte read)."""
        if level not in FILE_CHECKS:
            raise UserError(f"--verify-shards must be one of {', '.join(FILE_CHECKS)}, not {level!r}")
        if level == "quick" and any(s.sampled_fingerprint is None for s in self.shards):
            log.warning("manifest %s predates sampled fingerprints: only shard sizes are checked; rebuild it "
                        "(`dho-pipeline manifest`, same fingerprint) or pass --verify-shards full",
                        self.source or "given")
        for shard in self.shards:
            problem = shard_change(shard, level)
            if problem:
                raise UserError(self.changed_message(shard, problem))

    def changed_message(self, shard: "ShardEntry", problem: str) -> str:
        return changed_message(shard.name, shard.path, problem, self.source)

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

    def check_class_count(self, num_classes: int, source: str, *, allow_unused: bool = False,
                          checked_before: bool = False) -> str | None:
        """Labels inside the class list, and a list no longer than the labels imply: ImageNet's 1000
        names for a 5-class data set make a 1000-way teacher, a silently wrong student. A longer list is
        refused unless `allow_unused` (an ImageNet subset keeping ImageNet's indices); one that was
        `checked_before` (a cache's, checked by cache-teacher) only gets a warning (returned)."""
        self.check_labels(num_classes)
        implied = self.label_range()
        if implied is None or num_classes <= implied or allow_unused:
            return None
        numbers = (f"the class list ({source}) has {num_classes} names but the labels run 0..{implied - 1} "
                   f"({implied} class{'es' if implied != 1 else ''}): classes {implied}..{num_classes - 1} have no labeled sample")
        if checked_before:
            return numbers
        raise UserError(
            f"{numbers}; pass the data set's own class names (--classnames FILE; `dho-pipeline shard` writes "
            "classes.txt beside the shards), or --allow-unused-classes if the last classes simply have no labeled "
            "image (an ImageNet subset keeping ImageNet's indices)"
        )

    def label_range(self) -> int | None:
        """1 + the largest label (None when no sample is labeled): how many classes the labels imply."""
        largest = max((label for shard in self.shards for label in (shard.labels or []) if label is not None), default=None)
        return None if largest is None else largest + 1


def changed_message(name: str, path, problem: str, manifest_path=None) -> str:
    """One line for a shard that is missing or no longer the file its manifest describes."""
    if problem == "missing":
        return (
            f"shard {name} is missing: {path} does not exist; restore it, or if the shards moved, point the "
            f"manifest at their new place with `dho-pipeline manifest 'NEW_FOLDER/*.tar' --relocate "
            f"{manifest_path or 'MANIFEST.json'} --out NEW.json` (or edit its \"path\" fields: only paths may be "
            "edited); caches and splits stay valid"
        )
    return (
        f"shard {name} changed since the manifest was built ({path}: {problem}); restore the original, or if "
        "the new content is meant, rebuild the manifest (`dho-pipeline manifest`) and then the cache and split from it"
    )


def shard_change(shard: ShardEntry, level: str = "quick") -> str | None:
    """How a shard file differs from its manifest entry ("missing", or what differs), or None."""
    try:
        with open(shard.path, "rb") as stream:
            return file_change(stream, size=shard.size, sampled=shard.sampled_fingerprint, sha256=shard.fingerprint,
                               level=level)
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except IsADirectoryError:
        return "a directory, not a tar file"


def file_change(stream, *, size: int, sampled: str | None, sha256: str, level: str = "quick") -> str | None:
    """How an open file differs from what was recorded of it (see hashing.FILE_CHECKS), or None. A
    record without a sampled fingerprint (older manifests) is checked quickly by size alone."""
    actual = os.fstat(stream.fileno()).st_size
    if actual != size:
        return f"{actual} bytes, the manifest says {size}"
    if level == "full":
        stream.seek(0)
        if fingerprint_stream(stream) != sha256:
            return "its sha256 differs from the manifest's: other content of the same size"
    elif sampled is not None and sampled_fingerprint(stream, size) != sampled:
        return "its sampled blocks differ from the manifest's: other content of the same size"
    return None


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
        sources=scan.sources if any(source is not None for source in scan.sources) else None,
        sampled_fingerprint=scan.sampled_fingerprint,
    )


def relocate_manifest(manifest: Manifest, paths: list[Path]) -> Manifest:
    """The same manifest with its shards at `paths` (matched by file name, each checked quickly against
    its entry: size and sampled fingerprint); content and fingerprint unchanged."""
    by_name = {path.name: path for path in paths}
    absent = [shard.name for shard in manifest.shards if shard.name not in by_name]
    if absent:
        raise UserError(f"--relocate: no shard named {absent[0]} among the shards given"
                        + (f" (and {len(absent) - 1} more missing)" if len(absent) > 1 else ""))
    extra = sorted(set(by_name) - {shard.name for shard in manifest.shards})
    if extra:
        raise UserError(f"--relocate: {by_name[extra[0]]} is not a shard of {manifest.source}; list only its shards")
    moved = [dataclasses.replace(shard, path=by_name[shard.name]) for shard in manifest.shards]
    relocated = dataclasses.replace(manifest, shards=moved)
    for shard in moved:
        problem = shard_change(shard)
        if problem:
            raise UserError(f"--relocate: {shard.path} is not the shard {shard.name} of {manifest.source} ({problem})")
    return relocated


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
        json.dumps({"path": _stored_path(entry.path, path.parent), **entry.content(),
                    **({"sampled_fingerprint": entry.sampled_fingerprint} if entry.sampled_fingerprint else {})},
                   ensure_ascii=False)
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
    return dataclasses.replace(manifest, source=path)


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
        ("sampled_fingerprint", isinstance(raw.get("sampled_fingerprint", ""), str), "a string"),
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
    if "sources" in raw:
        per_sample("sources", lambda v: v is None or (isinstance(v, str) and v != ""), "file names (or null)")
    return ShardEntry(
        name=raw["name"], path=_resolve(path.parent, raw["path"]), num_samples=count, size=raw["size"],
        fingerprint=raw["fingerprint"], keys=raw["keys"], labels=raw["labels"], image_ext=raw["image_ext"],
        image_offsets=raw["image_offsets"], image_sizes=raw["image_sizes"], sources=raw.get("sources"),
        sampled_fingerprint=raw.get("sampled_fingerprint"),
    )


def _resolve(manifest_dir: Path, stored: str) -> Path:
    stored_path = Path(stored)
    return stored_path if stored_path.is_absolute() else manifest_dir / stored_path
