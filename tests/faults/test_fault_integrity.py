"""Integrity: a damaged cache or a changed shard is named before any step uses it, never trained on.

Cache faults land in a copy of one complete cache (2 shards x 8 samples, 2 views, top-3): a lost chunk
file of each array (what a partial copy or sync leaves), flipped bits (in a decoded value, in stored
bytes), a NaN logit, a log-partition too small for its logits. Each is named by `cache verify` and by
`train` (cache, shard and array, one line, no student written), and the rerun of `cache-teacher`
recomputes the damaged shard alone. Shard faults: another tar of the same size and keys (other pixels),
a shard re-made with another seed, a byte changed where the quick check does not look, a compressed
tar, shards that moved. `pytest tests/faults -s` prints each outcome as a FAULTS line.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import lzma
import shutil
import tarfile

import numpy as np
import pytest
import zarr
from fault_helpers import (  # noqa: F401  (one_torch_thread is an autouse fixture)
    assert_clean_error, cache_args, dump_records, invoke, jpeg, label, one_torch_thread, rows_lost,
    trainable_dataset, verify_ok, write_lists, write_tar,
)
from helpers import random_image
from PIL import Image

from dho_pipeline.cache_store import TeacherCache
from dho_pipeline.manifest import load_manifest

CACHE_OPTIONS = ("--views", "2", "--topk", "3")
ARRAYS = ("topk_logit", "topk_index", "flip", "log_partition", "box")
OUTCOMES: list[str] = []


def _outcome(case: str, line: str) -> None:
    OUTCOMES.append(case)
    print(f"\nFAULTS integrity #{len(OUTCOMES)} {case}: {line[:170]}")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Two labeled shards of 8, a 2-view top-3 cache (T = 1, 2) built from them, and a 25% split."""
    return trainable_dataset(tmp_path_factory.mktemp("integrity"), num_shards=2, per_shard=8,
                             cache_options=CACHE_OPTIONS)


@pytest.fixture(scope="module")
def student(base, tmp_path_factory):
    """A student trained on the intact data (a checkpoint for evaluate and calibrate)."""
    run = tmp_path_factory.mktemp("student") / "run"
    result = _train(base, run)
    assert result.exit_code == 0, result.output
    return run / "student.pt"


def _train(data, out, *extra, **paths):
    data = {**data, **paths}
    return invoke("train", "--cache", data["cache"], "--manifest", data["manifest"], "--split", data["split"],
                  "--out", out, "--student", "dho-tiny-student", "--pretrained", "none", "--batch-size", "4",
                  "--workers", "0", "--epochs", "1", *extra)


def _evaluate(checkpoint, manifest, *extra):
    return invoke("evaluate", "--checkpoint", checkpoint, "--data", manifest, "--workers", "0", "--batch-size", "4",
                  *extra)


def _copy_cache(base, tmp_path):
    copy = tmp_path / "c.zarr"
    shutil.copytree(base["cache"], copy)
    return copy


def _chunk(cache, array: str, shard: int = 1):
    """The one chunk file of `array` in a shard's group (8 rows, chunked by 8)."""
    ndim = {"flip": 2}.get(array, 3)
    return cache / "shards" / f"{shard:06d}" / array / "c" / "/".join(["0"] * ndim)


def _rewrite(cache, array: str, change, shard: int = 1, checksum: bool = False) -> None:
    """Change an array's decoded values through zarr; with `checksum` the marker's digests (if any) are
    updated too, as docs/cache-format.md defines them, as if the values had been written so (a teacher's
    NaN, a cache from before checksums)."""
    group = zarr.open_group(store=str(cache), path=f"shards/{shard:06d}", mode="r+")
    values = group[array][...]
    change(values)
    group[array][...] = values
    if checksum and "checksums" in group.attrs:
        checksums = dict(group.attrs["checksums"])
        rows = checksums["chunk_rows"]
        digests = [hashlib.blake2b(np.ascontiguousarray(values[i:i + rows], dtype=values.dtype.newbyteorder("<"))
                                   .tobytes(), digest_size=16).hexdigest() for i in range(0, len(values), rows)]
        checksums["arrays"] = {**checksums["arrays"], array: digests}
        group.attrs["checksums"] = checksums


def _refused_before_training(result, run, *needles) -> str:
    line = assert_clean_error(result, *needles)
    assert not (run / "student.pt").exists() and not (run / "checkpoints").exists()
    return line


# ---- the cache --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("array", ARRAYS)
def test_a_lost_chunk_of_each_array_is_named(base, tmp_path, array):
    cache = _copy_cache(base, tmp_path)
    chunk = _chunk(cache, array)
    assert chunk.is_file()  # the fault lands: a chunk that zarr stored (all-fill chunks are never stored)
    chunk.unlink()
    where = f"shard shard-000001.tar, array {array}: chunk 0 (rows 0-7) is missing"

    line = _refused_before_training(_train(base, tmp_path / "run", cache=cache), tmp_path / "run", str(cache), where)
    result = invoke("cache", "verify", cache, "--manifest", base["manifest"])
    assert result.exit_code != 0 and where in result.output, result.output
    _outcome(f"lost {array} chunk (verify, train)", line)


@pytest.mark.slow
def test_flipped_bits_are_named(base, tmp_path):
    # A bit flipped in a decoded class index (bit rot before compression, or in memory), e.g. 3 -> 4099,
    # in both views of a sample, so that training would use it whichever view it shows.
    cache = _copy_cache(base, tmp_path)
    _rewrite(cache, "topk_index", lambda v: v.__setitem__((2, slice(None), 0), v[2, :, 0] ^ 0x1000))
    line = _refused_before_training(_train(base, tmp_path / "run", cache=cache), tmp_path / "run",
                                    "shard shard-000001.tar, array topk_index: chunk 0", "does not match its checksum")
    _outcome("bit flip in a class index (train)", line)
    # The same index with a checksum that agrees (a cache from before checksums): still no kd.py traceback.
    _rewrite(cache, "topk_index", lambda v: None, checksum=True)
    line = _refused_before_training(_train(base, tmp_path / "run", cache=cache), tmp_path / "run",
                                    "array topk_index: class index", "outside the class list (0..4)")
    _outcome("class index outside the class list, checksum agreeing (train)", line)

    # A bit flipped in the stored (compressed) bytes of a logit chunk.
    cache = tmp_path / "raw.zarr"
    shutil.copytree(base["cache"], cache)
    chunk = _chunk(cache, "topk_logit")
    stored = bytearray(chunk.read_bytes())
    stored[len(stored) * 2 // 3] ^= 0x20
    chunk.write_bytes(bytes(stored))
    result = invoke("cache", "verify", cache, "--manifest", base["manifest"])
    assert result.exit_code != 0 and "array topk_logit: chunk 0" in result.output, result.output
    line = _refused_before_training(_train(base, tmp_path / "run2", cache=cache), tmp_path / "run2",
                                    "shard shard-000001.tar, array topk_logit: chunk 0")
    assert "does not match its checksum" in line or "cannot be decoded" in line
    _outcome("bit flip in stored logit bytes (verify, train)", line)


@pytest.mark.slow
def test_values_a_teacher_cannot_produce_are_refused_even_with_agreeing_checksums(base, tmp_path):
    cache = _copy_cache(base, tmp_path)
    _rewrite(cache, "topk_logit", lambda v: v.__setitem__((3, 0, 1), np.nan), checksum=True)
    line = _refused_before_training(_train(base, tmp_path / "run", cache=cache), tmp_path / "run",
                                    "shard shard-000001.tar, array topk_logit: a non-finite logit at key")
    _outcome("NaN logit (train)", line)
    result = invoke("cache", "verify", cache, "--manifest", base["manifest"])
    assert result.exit_code != 0 and "non-finite logit" in result.output, result.output

    cache = tmp_path / "lp.zarr"
    shutil.copytree(base["cache"], cache)
    _rewrite(cache, "log_partition", lambda v: v.__setitem__((5, 1), v[5, 1] - 3), checksum=True)
    line = _refused_before_training(_train(base, tmp_path / "run2", cache=cache), tmp_path / "run2",
                                    "array log_partition: top-k probabilities at T = ", "sum past 1")
    _outcome("top-k probabilities past the log-partition (train)", line)


@pytest.mark.slow
def test_cache_teacher_recomputes_only_the_damaged_shards(base, tmp_path, caplog):
    cache = _copy_cache(base, tmp_path)
    _chunk(cache, "topk_logit").unlink()
    untouched = (cache / "shards" / "000000" / "zarr.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="dho_pipeline"):
        result = invoke(*cache_args(base, cache, *CACHE_OPTIONS))
    assert result.exit_code == 0 and "complete" in result.output, result.output
    assert "shard shard-000001.tar, array topk_logit: chunk 0 (rows 0-7) is missing" in caplog.text
    assert "computing this shard again" in caplog.text and "(1 of them damaged, computed again)" in caplog.text
    assert (cache / "shards" / "000000" / "zarr.json").stat().st_mtime_ns == untouched  # not rewritten
    assert rows_lost(dump_records(base["cache"]), dump_records(cache)) == []
    verify_ok(cache, base["manifest"])
    _outcome("lost chunk, cache-teacher rerun", "recomputed shard-000001.tar alone; cache equal to the original")


def test_a_cache_from_before_checksums_is_read_with_a_note(base, tmp_path):
    cache = _copy_cache(base, tmp_path)
    for marker in (cache / "shards").glob("*/zarr.json"):
        meta = json.loads(marker.read_text())
        meta["attributes"].pop("checksums", None), meta["attributes"].pop("source", None)
        marker.write_text(json.dumps(meta))
    info = invoke("cache", "info", cache)
    assert info.exit_code == 0 and "checksums    0 of 2 complete shard(s); the others were written before" \
        in info.output, info.output
    result = invoke("cache", "verify", cache, "--manifest", base["manifest"])
    assert result.exit_code == 0 and "OK (2 of 2 shards were written before checksums" in result.output, result.output
    # Its values are still checked: a lost class-index chunk reads back as zeros, a class listed K times.
    _chunk(cache, "topk_index").unlink()
    result = invoke("cache", "verify", cache, "--manifest", base["manifest"])
    assert result.exit_code != 0 and "array topk_index: a class listed twice" in result.output, result.output
    _outcome("cache from before checksums (info, verify)", info.output.splitlines()[7])


# ---- the shards -------------------------------------------------------------------------------------


def _same_size_jpeg(data: bytes, seed: int) -> bytes:
    """Another picture in exactly as many JPEG bytes (a comment segment pads it out)."""
    with Image.open(io.BytesIO(data)) as image:
        size = image.size
    rng = np.random.default_rng(seed)
    for quality in (60, 30, 10, 2):
        buffer = io.BytesIO()
        random_image(rng, *size).save(buffer, format="JPEG", quality=quality)
        other = buffer.getvalue()
        if len(other) + 4 <= len(data):
            pad = len(data) - len(other)
            return other[:2] + b"\xff\xfe" + (pad - 2).to_bytes(2, "big") + b"\0" * (pad - 4) + other[2:]
    raise AssertionError("could not make a smaller JPEG")


def _replace_with_same_size_tar(path) -> None:
    """Another tar of the same size and the same members (keys, labels, sizes), other pixels."""
    with tarfile.open(path) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive.getmembers()]
        fmt = archive.format
    before = path.stat().st_size
    with tarfile.open(path, "w", format=fmt) as archive:
        for n, (member, data) in enumerate(members):
            if member.name.endswith(".jpg"):
                data = _same_size_jpeg(data, 100 + n)
            archive.addfile(member, io.BytesIO(data))
    assert path.stat().st_size == before


@pytest.mark.slow
def test_a_shard_replaced_by_a_same_size_tar_is_refused_everywhere(base, student, tmp_path):
    data = {**base, "root": tmp_path}
    shutil.copytree(base["root"] / "shards", tmp_path / "shards")
    document = json.loads(base["manifest"].read_text())
    for entry in document["shards"]:
        entry["path"] = str(tmp_path / "shards" / entry["name"])  # only paths edited: the same manifest
    data["manifest"] = tmp_path / "m.json"
    data["manifest"].write_text(json.dumps(document))
    cache = _copy_cache(base, tmp_path)
    shard = tmp_path / "shards" / "shard-000001.tar"
    original = shard.read_bytes()
    _replace_with_same_size_tar(shard)
    assert shard.read_bytes() != original

    expected = "shard shard-000001.tar changed since the manifest was built"
    result = invoke(*cache_args(data, cache, *CACHE_OPTIONS))
    _outcome("same-size tar, other pixels (cache-teacher rerun)", assert_clean_error(result, expected))
    result = invoke("cache", "verify", cache, "--manifest", data["manifest"])
    assert result.exit_code != 0 and expected in result.output, result.output
    _outcome("same-size tar, other pixels (verify)", result.output.splitlines()[0])
    line = _refused_before_training(_train(data, tmp_path / "run", cache=cache), tmp_path / "run", expected)
    _outcome("same-size tar, other pixels (train)", line)
    _outcome("same-size tar, other pixels (evaluate)",
             assert_clean_error(_evaluate(student, data["manifest"]), expected))

    shard.write_bytes(original)  # restored: everything goes through again
    verify_ok(cache, data["manifest"])


def test_a_reader_names_a_shard_that_changes_while_it_runs(base, tmp_path):
    """The data path checks each shard as it opens it, after the stage's own check passed."""
    from dho_pipeline.student_data import FiniteIdStream, SampleTable, StudentBatches

    shutil.copytree(base["root"] / "shards", tmp_path / "shards")
    manifest = load_manifest(base["manifest"])
    manifest = type(manifest)([s.__class__(**{**s.__dict__, "path": tmp_path / "shards" / s.name})
                               for s in manifest.shards], manifest.fingerprint)
    manifest.check_files()
    table = SampleTable.from_manifest(manifest)
    _replace_with_same_size_tar(tmp_path / "shards" / "shard-000000.tar")
    stream = FiniteIdStream(np.arange(16), 16, 0, 1)
    with pytest.raises(Exception) as caught:
        list(StudentBatches(table, stream, (32, 32), num_batches=1))
    assert "shard shard-000000.tar changed since the manifest was built" in str(caught.value)
    _outcome("shard changed after the stage's check (data path)", str(caught.value))


def _class_tree(root, seed=0):
    rng = np.random.default_rng(seed)
    for c, name in enumerate(("cat", "dog", "bird", "fish", "frog")):
        (root / name).mkdir(parents=True)
        for i in range(3):
            random_image(rng, 40 + 8 * i, 32 + 4 * c).save(root / name / f"{name}{i}.jpg", format="JPEG")


def test_a_shard_remade_with_another_seed_is_named_as_changed(student, tmp_path):
    _class_tree(tmp_path / "tree")
    pattern = str(tmp_path / "shards" / "s-%06d.tar")
    assert invoke("shard", tmp_path / "tree", "--out", pattern, "--seed", "0").exit_code == 0
    shard = tmp_path / "shards" / "s-000000.tar"
    assert invoke("manifest", shard, "--out", tmp_path / "m.json").exit_code == 0
    before = shard.read_bytes()
    assert invoke("shard", tmp_path / "tree", "--out", pattern, "--seed", "1", "--overwrite").exit_code == 0
    assert len(shard.read_bytes()) == len(before) and shard.read_bytes() != before  # same size, other order
    line = assert_clean_error(_evaluate(student, tmp_path / "m.json"),
                              "shard s-000000.tar changed since the manifest was built", "rebuild the manifest")
    assert "cannot decode" not in line
    _outcome("shard re-made with another seed (evaluate)", line)


def _big_shard(path):
    """A shard over 64 KiB (so the quick check samples it) with tar padding after its members."""
    rng = np.random.default_rng(3)
    members = []
    for i in range(6):
        noise = Image.fromarray(rng.integers(0, 256, (150, 150, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        noise.save(buffer, format="JPEG", quality=90)
        members += [(f"k{i}.jpg", buffer.getvalue()), (f"k{i}.cls", label(i % 5))]
    return write_tar(path, members)


def _unsampled_padding_byte(path) -> int:
    """A byte of tar padding outside the 16 blocks of 4 KiB that the quick check hashes (the test
    checks that the quick check indeed misses it: hashing.sampled_fingerprint)."""
    size = path.stat().st_size
    blocks = [i * (size - 4096) // 15 for i in range(16)]
    with tarfile.open(path) as archive:
        for member in archive.getmembers():
            end = member.offset_data + member.size
            for position in range(end, -(-end // 512) * 512):
                if not any(b <= position < b + 4096 for b in blocks):
                    return position
    raise AssertionError("no padding byte outside the sampled blocks")


def test_stage_one_hashes_each_shard_whole_before_marking_it_complete(tmp_path):
    shard = _big_shard(tmp_path / "shards" / "big-000000.tar")
    classes, templates = write_lists(tmp_path)
    assert invoke("manifest", shard, "--out", tmp_path / "m.json").exit_code == 0
    assert shard.stat().st_size > 64 * 1024  # the quick check samples it (hashing.sampled_fingerprint)
    data = bytearray(shard.read_bytes())
    data[_unsampled_padding_byte(shard)] = 0xFF  # the images are intact; the file is not the scanned one
    shard.write_bytes(bytes(data))

    data = {"manifest": tmp_path / "m.json", "classes": classes, "templates": templates}
    result = invoke(*cache_args(data, tmp_path / "c.zarr"))
    line = assert_clean_error(result, "shard big-000000.tar changed since the manifest was built",
                              "hashed while the teacher read it")
    assert not TeacherCache.open(tmp_path / "c.zarr").is_complete(0)
    from dho_pipeline.manifest import shard_change

    entry = load_manifest(tmp_path / "m.json").shards[0]
    assert shard_change(entry, "quick") is None  # the change was out of the quick check's sight ...
    assert "sha256 differs" in shard_change(entry, "full")  # ... not of the full one
    _outcome("shard changed between the quick check's blocks (cache-teacher)", line)
    line = assert_clean_error(invoke(*cache_args(data, tmp_path / "c2.zarr", "--verify-shards", "full")),
                              "sha256 differs")
    assert not (tmp_path / "c2.zarr").exists()  # refused before the teacher loads
    _outcome("same, --verify-shards full", line)


@pytest.mark.parametrize("kind", ["gzip", "xz"])
def test_a_compressed_shard_is_refused_as_compressed(base, tmp_path, kind):
    raw = base["shards"][0].read_bytes()
    packed = tmp_path / f"shard.tar.{'gz' if kind == 'gzip' else 'xz'}"
    packed.write_bytes(gzip.compress(raw) if kind == "gzip" else lzma.compress(raw))
    result = invoke("manifest", packed, "--out", tmp_path / "m.json")
    line = assert_clean_error(result, packed.name, f"is a compressed tar ({kind})", "decompress it")
    assert "truncated" not in line and not (tmp_path / "m.json").exists()
    _outcome(f"{kind}-compressed shard (manifest)", line)


@pytest.mark.slow
def test_moved_shards_are_told_how_to_relocate(base, student, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(base["root"], root)
    data = {**base, "manifest": root / "manifest.json", "cache": root / "c.zarr", "split": root / "s.json"}
    (root / "shards").rename(root / "moved")
    line = _refused_before_training(_train(data, tmp_path / "run"), tmp_path / "run",
                                    "shard shard-000000.tar is missing", "--relocate", "only paths may be edited")
    assert "without it" not in line
    _outcome("shards moved (train)", line)
    _outcome("shards moved (evaluate)", assert_clean_error(_evaluate(student, data["manifest"]), "--relocate"))

    # Relocating checks each shard and keeps the fingerprint, so the cache and split still belong to it.
    relocated = tmp_path / "relocated.json"
    result = invoke("manifest", str(root / "moved" / "*.tar"), "--relocate", data["manifest"], "--out", relocated)
    assert result.exit_code == 0, result.output
    assert json.loads(relocated.read_text())["fingerprint"] == json.loads(data["manifest"].read_text())["fingerprint"]
    result = _train(data, tmp_path / "run", "--max-steps", "1", manifest=relocated)
    assert result.exit_code == 0, result.output
    assert _evaluate(student, relocated).exit_code == 0

    # A shard that is not the one moved is refused by --relocate itself.
    _replace_with_same_size_tar(root / "moved" / "shard-000001.tar")
    result = invoke("manifest", str(root / "moved" / "*.tar"), "--relocate", data["manifest"], "--out", relocated)
    _outcome("relocating onto a changed shard", assert_clean_error(result, "is not the shard shard-000001.tar"))


# ---- messages -----------------------------------------------------------------------------------------


def test_calibrating_on_a_single_image_warns_with_the_number(student, tmp_path, caplog):
    one = write_tar(tmp_path / "one-000000.tar", [("lonely.jpg", jpeg(7)), ("lonely.cls", label(2))])
    assert invoke("manifest", one, "--out", tmp_path / "one.json").exit_code == 0
    out = tmp_path / "calibrated.pt"
    with caplog.at_level(logging.WARNING, logger="dho_pipeline"):
        result = invoke("calibrate", "--checkpoint", student, "--data", tmp_path / "one.json", "--out", out,
                        "--workers", "0")
    assert result.exit_code == 0, result.output
    warning = "calibrating on 1 held-out image, fewer than the 5 classes"
    assert warning in caplog.text
    assert json.loads(out.with_name(out.name + ".calibration.json").read_text())["warning"].startswith(warning)
    _outcome("calibrate on one held-out image", caplog.records[-1].getMessage())


def test_summary_of_integrity_faults(request):
    """Runs last in this module: how many faults met their outcome."""
    print(f"\nFAULTS integrity: {len(OUTCOMES)} faults, each named before use")
    assert len(OUTCOMES) == len(set(OUTCOMES))
