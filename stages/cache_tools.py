"""Looking into a teacher cache: `cache info`, `cache verify`, `cache dump`.

    dho-pipeline cache info CACHE.zarr [--json]
    dho-pipeline cache verify CACHE.zarr --manifest M.json [--verify-shards quick|full|skip]
    dho-pipeline cache dump CACHE.zarr [--shard NAME] [--limit N]
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from dho_pipeline.cache_store import REPAIR, TeacherCache
from dho_pipeline.errors import UserError
from dho_pipeline.views import box_fractions


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def info(path: Path) -> dict:
    cache = TeacherCache.open(path)
    spec = cache.spec
    shard_attrs = [cache.shard_attrs(i) or {} for i in range(len(spec.shards))]
    complete = [bool(a.get("complete")) for a in shard_attrs]
    missing = [
        {"shard": spec.shards[i]["name"], **item}
        for i, attrs in enumerate(shard_attrs) if attrs.get("complete")
        for item in attrs.get("missing", [])
    ]
    checksummed = [bool(a.get("checksums")) for a in shard_attrs]
    num_samples = sum(s["num_samples"] for s in spec.shards)
    cached_views = sum(s["num_samples"] for s, done in zip(spec.shards, complete) if done) * spec.num_views
    size = _disk_bytes(Path(path))
    return {
        "path": str(path),
        "teacher": spec.teacher,
        "num_classes": spec.num_classes,
        "num_templates": len(spec.templates),
        "preprocess": spec.preprocess,
        "views": spec.views,
        "topk": spec.topk,
        "full_logits": spec.full_logits,
        "temperatures": spec.temperatures,
        "manifest_fingerprint": spec.manifest_fingerprint,
        "num_shards": len(spec.shards),
        "complete_shards": sum(complete),
        "incomplete_shards": [s["name"] for s, done in zip(spec.shards, complete) if not done],
        "checksummed_shards": sum(c and done for c, done in zip(checksummed, complete)),
        "num_samples": num_samples,
        "num_missing": len(missing),
        "missing": missing,
        "disk_bytes": size,
        "bytes_per_view": round(size / cached_views, 1) if cached_views else None,
    }


def format_info(report: dict) -> str:
    teacher = report["teacher"]
    views = report["views"]
    pre = report["preprocess"]
    lines = [
        f"cache        {report['path']}",
        f"teacher      {teacher['model']} / {teacher['pretrained']}  ({teacher['weights_fingerprint'][:23]})",
        f"classes      {report['num_classes']} classes, {report['num_templates']} templates",
        f"input        {pre['image_size'][0]}x{pre['image_size'][1]}, resize {pre['resize_mode']}, {pre['interpolation']}",
        f"views        {views['num_views']} per image (view 0: {views['view0']}; seed {views['seed']})",
        f"logits       {'all' if report['full_logits'] else 'top-' + str(report['topk'])}, "
        f"log-partition at T = {', '.join(f'{t:g}' for t in report['temperatures'])}",
        f"shards       {report['complete_shards']} of {report['num_shards']} complete",
        f"checksums    {_checksum_line(report)}",
        f"samples      {report['num_samples']}, {report['num_missing']} recorded as missing",
        f"size         {report['disk_bytes'] / 1e6:.2f} MB"
        + (f" ({report['bytes_per_view']} bytes per view)" if report["bytes_per_view"] else ""),
    ]
    if report["incomplete_shards"]:
        shown = ", ".join(report["incomplete_shards"][:5])
        lines.append(f"incomplete   {shown}{' ...' if len(report['incomplete_shards']) > 5 else ''}")
    for item in report["missing"][:20]:
        lines.append(f"missing      {_printable(item['shard'])} {_printable(item['key'])}: {_printable(item['reason'])}")
    if len(report["missing"]) > 20:
        lines.append(f"missing      ... and {len(report['missing']) - 20} more (see --json)")
    return "\n".join(lines)


def _checksum_line(report: dict) -> str:
    complete, checked = report["complete_shards"], report["checksummed_shards"]
    if checked == complete:
        return f"every chunk of the {complete} complete shard(s) (BLAKE2b of its decoded rows)"
    return (f"{checked} of {complete} complete shard(s); the others were written before checksums were recorded: "
            "their values are checked, but a lost chunk of flips or logits can pass unseen (rebuild the cache to "
            "add checksums)")


def _printable(text: str) -> str:
    """Keys come from tar member names: escape control characters rather than send them to a terminal."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(text))


def verify(path: Path, manifest_path: Path, shards: str = "quick") -> list[str]:
    """Deep check of a cache against its manifest. Returns problems, one line each, naming the shard.

    Every chunk of every complete shard against its checksum and every value (cache_store.shard_problem),
    and, unless `shards` is "skip", each shard file against the manifest ("quick" or "full", as
    manifest.check_files)."""
    from dho_pipeline.manifest import load_manifest, shard_change

    cache = TeacherCache.open(path)
    manifest = load_manifest(manifest_path)
    spec = cache.spec
    if spec.manifest_fingerprint != manifest.fingerprint:
        return [f"cache {path} was built from a different manifest than {manifest_path}"]
    problems = []
    for index, shard in enumerate(manifest.shards):
        if not cache.is_complete(index):
            problems.append(f"shard {shard.name}: not complete (rerun cache-teacher to finish it)")
            continue
        problem = cache.shard_problem(index, shard.keys, shard.fingerprint)
        if problem:
            problems.append(f"{problem}; {REPAIR}")
        change = shard_change(shard, shards) if shards != "skip" else None
        if change:
            problems.append(manifest.changed_message(shard, change))
    return problems


def unchecked_note(path: Path) -> str:
    """For `verify`'s OK line: how many shards had no checksums to check (caches from before them)."""
    note = TeacherCache.open(path).unchecked_note()
    return f" ({note})" if note else ""


def dump(path: Path, shard: str | None = None, limit: int | None = None) -> Iterator[dict]:
    """One JSON-able object per sample, in manifest order."""
    cache = TeacherCache.open(path)
    spec = cache.spec
    names = [s["name"] for s in spec.shards]
    if shard is not None and shard not in names:
        raise UserError(f"cache {path} has no shard named {shard!r} (it has {names[0]} ... {names[-1]})")
    emitted = 0
    temperature_names = [f"{t:g}" for t in spec.temperatures]
    for index, name in enumerate(names):
        if shard is not None and name != shard:
            continue
        if not cache.is_complete(index):
            continue
        arrays = cache.read_shard(index)
        for row, key in enumerate(arrays["key"]):
            if limit is not None and emitted >= limit:
                return
            record = {"shard": name, "key": str(key)}
            if arrays["missing"][row]:
                record["missing"] = True
            else:
                record["views"] = [
                    {
                        "box": [round(f, 6) for f in box_fractions(arrays["box"][row, view])],
                        "flip": bool(arrays["flip"][row, view]),
                        "topk_index": arrays["topk_index"][row, view].tolist(),
                        "topk_logit": [float(x) for x in arrays["topk_logit"][row, view]],
                        "log_partition": {
                            t: float(x) for t, x in zip(temperature_names, arrays["log_partition"][row, view])
                        },
                    }
                    for view in range(spec.num_views)
                ]
            emitted += 1
            yield record

