"""Stage one end to end on generated shards with a tiny open_clip teacher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
import webdataset as wds
from helpers import BIN, cache_args, cli, dump, image_bytes, run_command, write_lists, write_shards
from PIL import Image

from dho_pipeline.cache_store import TeacherCache, exclusive_writer
from dho_pipeline.clip_models import class_text_embeddings, load_clip
from dho_pipeline.teacher import ZeroShotTeacher
from dho_pipeline.views import decode_rgb, render_view


def teacher_logits_for(data, cache_path, rows):
    """Recompute the teacher's full logits for cached views, independently of the cache writer."""
    spec = TeacherCache.open(cache_path).spec
    loaded = load_clip("dho-test-vit", "none")
    embeddings = class_text_embeddings(loaded, spec.classnames, spec.templates, normalize=True)
    teacher = ZeroShotTeacher(loaded.model.visual, embeddings).eval()
    mean = torch.tensor(spec.preprocess["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(spec.preprocess["std"]).view(1, 3, 1, 1)

    def logits(pixels: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.array(pixels)).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            return teacher((x - mean) / std)

    return logits


def test_cache_holds_exact_topk_and_log_partitions(dataset):
    out = dataset["root"] / "c.zarr"
    result = cli(*cache_args(dataset, out, "--views", "3", "--topk", "3", "--temperatures", "1,2,4"))
    assert "complete" in result.output
    cli("cache", "verify", out, "--manifest", dataset["manifest"])

    records = dump(out)
    manifest_keys = [s.keys for s in __import__("dho_pipeline.manifest", fromlist=["x"]).load_manifest(dataset["manifest"]).shards]
    assert [r["key"] for r in records] == [k for keys in manifest_keys for k in keys]
    logits_of = teacher_logits_for(dataset, out, records)
    size = tuple(TeacherCache.open(out).spec.preprocess["image_size"])
    for shard_path in dataset["shards"]:
        for sample in wds.WebDataset(str(shard_path), shardshuffle=False):
            record = next(r for r in records if r["key"] == sample["__key__"])
            assert set(record) == {"shard", "key", "views"} and len(record["views"]) == 3
            image = decode_rgb(sample["jpg"])
            pixels = np.stack([
                render_view(image, np.round(np.array(v["box"]) * 65535).astype(np.uint16), v["flip"], size)
                for v in record["views"]
            ])
            full = logits_of(pixels)
            for view, logits in zip(record["views"], full):
                top = logits.topk(3)
                assert view["topk_index"] == top.indices.tolist()
                assert np.allclose(view["topk_logit"], top.values.numpy(), atol=0.02)
                for t in ("1", "2", "4"):
                    expected = torch.logsumexp(logits / float(t), dim=0).item()
                    assert abs(view["log_partition"][t] - expected) < 1e-4


def test_cache_info_and_full_logits(dataset):
    out = dataset["root"] / "full.zarr"
    cli(*cache_args(dataset, out, "--topk", "all", "--temperatures", "1"))
    report = json.loads(cli("cache", "info", out, "--json").stdout)
    assert report["full_logits"] and report["topk"] == 5 and report["complete_shards"] == 3
    assert report["teacher"]["model"] == "dho-test-vit" and report["num_missing"] == 0
    assert report["bytes_per_view"] > 0
    for record in dump(out)[:5]:
        view = record["views"][0]
        assert sorted(view["topk_index"]) == list(range(5))
        lse = np.log(np.exp(np.array(view["topk_logit"], dtype=np.float64)).sum())
        assert abs(lse - view["log_partition"]["1"]) < 0.02  # float16 logits vs exact fp32
    text = cli("cache", "info", out).output
    assert "3 of 3 complete" in text and "all, log-partition at T = 1" in text


def test_cache_metadata_identifies_what_built_it(dataset):
    out = dataset["root"] / "c.zarr"
    cli(*cache_args(dataset, out, "--views", "2", "--seed", "7"))
    attrs = TeacherCache.open(out).attrs
    for field in ("schema_version", "teacher", "classnames", "classnames_fingerprint", "templates",
                  "templates_fingerprint", "preprocess", "views", "topk", "temperatures", "manifest_fingerprint"):
        assert field in attrs, field
    assert attrs["views"]["seed"] == 7 and attrs["views"]["num_views"] == 2
    assert attrs["preprocess"]["resize_mode"] == "shortest" and attrs["views"]["view0"] == "center-square"
    assert attrs["status"]["complete"] is True
    # The same command with another setting is refused instead of mixing two caches.
    result = cli(*cache_args(dataset, out, "--views", "2", "--seed", "8"), expect_exit=1)
    assert "different views" in result.output


def test_bf16_teacher_keeps_fp32_logits(dataset):
    """Under bf16 autocast (the GPU default) the classifier still runs in fp32, and the cache is whole."""
    bf16, fp32 = dataset["root"] / "bf16.zarr", dataset["root"] / "fp32.zarr"
    cli(*cache_args(dataset, bf16, "--precision", "bf16", "--topk", "3"))
    cli(*cache_args(dataset, fp32, "--topk", "3"))
    cli("cache", "verify", bf16, "--manifest", dataset["manifest"])
    for a, b in zip(dump(bf16), dump(fp32)):  # the tower ran in bf16: close, not equal
        assert abs(a["views"][0]["log_partition"]["1"] - b["views"][0]["log_partition"]["1"]) < 0.5


def test_resize_override_changes_view0(dataset):
    out = dataset["root"] / "squash.zarr"
    cli(*cache_args(dataset, out, "--resize", "squash"))
    assert dump(out)[0]["views"][0]["box"] == [0.0, 0.0, 1.0, 1.0]


def test_view_convention_round_trip(tmp_path):
    """Asymmetric images: cached logits match an independent crop/flip and not a wrong convention."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "asym"
    folder.mkdir()
    with wds.TarWriter(str(folder / "a-000000.tar")) as writer:
        for i in range(4):
            pixels = np.zeros((60, 90, 3), np.uint8)  # wide image: swapping x and y matters
            pixels[:30, :45], pixels[:30, 45:] = (255, 0, 0), (0, 255, 0)
            pixels[30:, :45], pixels[30:, 45:] = (0, 0, 255), (255, 255, 0)
            pixels[:, :10] = rng.integers(0, 255, 3)  # a stripe at the left edge only
            writer.write({"__key__": f"img{i}", "png": image_bytes(Image.fromarray(pixels), "PNG"), "cls": 0})
    classes, templates = write_lists(tmp_path)
    cli("manifest", folder / "a-000000.tar", "--out", tmp_path / "m.json")
    data = {"manifest": tmp_path / "m.json", "classes": classes, "templates": templates}
    out = tmp_path / "c.zarr"
    cli(*cache_args(data, out, "--views", "8", "--topk", "all", "--temperatures", "1"))
    records = dump(out)
    logits_of = teacher_logits_for(data, out, records)

    from torchvision.transforms.v2 import functional as F

    def reference(image, box, flip, swap_xy=False):
        """torchvision's crop + resize + flip at whole pixels: an independent implementation."""
        x0, y0, x1, y1 = box
        if swap_xy:
            x0, y0, x1, y1 = y0, x0, y1, x1
        w, h = image.size
        top, left = round(y0 * h), round(x0 * w)
        view = F.resized_crop(image, top, left, round(y1 * h) - top, round(x1 * w) - left, [32, 32],
                              interpolation=F.InterpolationMode.BICUBIC, antialias=True)
        return np.asarray(F.horizontal_flip(view) if flip else view)

    samples = list(wds.WebDataset(str(folder / "a-000000.tar"), shardshuffle=False))
    gaps = {"right": [], "no_flip": [], "swapped": []}
    for record, sample in zip(records, samples):
        image = decode_rgb(sample["png"])
        for view in record["views"][1:]:
            cached = np.array(view["topk_logit"])[np.argsort(view["topk_index"])]
            for name, pixels in [
                ("right", reference(image, view["box"], view["flip"])),
                ("no_flip", reference(image, view["box"], not view["flip"])),
                ("swapped", reference(image, view["box"], view["flip"], swap_xy=True)),
            ]:
                gaps[name].append(np.abs(logits_of(pixels[None])[0].numpy() - cached).max())
    right, no_flip, swapped = (np.mean(gaps[k]) for k in ("right", "no_flip", "swapped"))
    print(f"logit gap: right {right:.4f}, flip ignored {no_flip:.4f}, x/y swapped {swapped:.4f}")
    assert right * 3 < no_flip and right * 3 < swapped, (right, no_flip, swapped)


def test_bad_inputs_give_one_line_errors(dataset, tmp_path):
    # A missing shard fails before the teacher is loaded (the default teacher's weights are not here).
    moved = dataset["shards"][1].with_suffix(".moved")
    dataset["shards"][1].rename(moved)
    result = cli("cache-teacher", "--manifest", dataset["manifest"], "--out", tmp_path / "x.zarr", expect_exit=1)
    assert "shard shard-000001.tar is missing" in result.output
    moved.rename(dataset["shards"][1])

    # A label outside the class list names the shard.
    classes, _ = write_lists(tmp_path / "few", classnames=["a", "b"])
    result = cli(*cache_args({**dataset, "classes": classes}, tmp_path / "y.zarr"), expect_exit=1)
    assert "outside the class list" in result.output and "shard-00000" in result.output

    # Unknown teacher, unreadable class list, templates without {}.
    result = cli(*cache_args(dataset, tmp_path / "z.zarr", "--teacher", "ViT-Q-99"), expect_exit=1)
    assert "unknown open_clip model 'ViT-Q-99'" in result.output
    (tmp_path / "bad-templates.txt").write_text("a photo\n")
    result = cli(*cache_args({**dataset, "templates": tmp_path / "bad-templates.txt"}, tmp_path / "z.zarr"), expect_exit=1)
    assert "exactly one '{}'" in result.output
    result = cli(*cache_args(dataset, tmp_path / "z.zarr", "--topk", "many"), expect_exit=2)
    assert "neither a number nor 'all'" in result.output


def test_missing_weights_fail_fast_with_instructions(dataset, tmp_path):
    started = time.time()
    result = cli("cache-teacher", "--manifest", dataset["manifest"], "--out", tmp_path / "x.zarr",
                 "--classnames", dataset["classes"], "--templates", dataset["templates"], expect_exit=1)
    assert time.time() - started < 30
    assert "ViT-H-14-378-quickgelu/dfn5b" in result.output and "--pretrained /path/to" in result.output
    assert not (tmp_path / "x.zarr" / "zarr.json").exists()


def _corrupt_sample(shard, key):
    """Rewrite a shard with one sample's image bytes replaced by garbage."""
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    with wds.TarWriter(str(shard)) as writer:
        for sample in samples:
            sample = {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
            if sample["__key__"] == key:
                sample["jpg"] = b"\xff\xd8 definitely not a jpeg"
            writer.write(sample)


def test_corrupt_image_fails_or_is_recorded_as_missing(dataset):
    shard = dataset["shards"][2]
    key = list(wds.WebDataset(str(shard), shardshuffle=False))[3]["__key__"]
    _corrupt_sample(shard, key)
    cli("manifest", str(dataset["root"] / "shards" / "shard-{000000..000002}.tar"), "--out", dataset["manifest"])

    out = dataset["root"] / "c.zarr"
    result = cli(*cache_args(dataset, out), expect_exit=1)
    assert f"shard shard-000002.tar, key {key!r}: cannot decode the image" in result.output
    assert "--on-error skip" in result.output
    assert not TeacherCache.open(out).is_complete(2)

    cli(*cache_args(dataset, out, "--on-error", "skip"))
    report = json.loads(cli("cache", "info", out, "--json").stdout)
    assert report["complete_shards"] == 3 and report["num_missing"] == 1
    assert report["missing"][0]["shard"] == "shard-000002.tar" and report["missing"][0]["key"] == key
    assert f"missing      shard-000002.tar {key}" in cli("cache", "info", out).output
    missing = [r for r in dump(out) if r["key"] == key]
    assert missing == [{"shard": "shard-000002.tar", "key": key, "missing": True}]
    cli("cache", "verify", out, "--manifest", dataset["manifest"])


def test_damaged_tar_is_never_marked_complete(dataset):
    shard = dataset["shards"][1]
    original = shard.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2 : len(damaged) // 2 + 2048] = b"\x00" * 2048  # same size, broken inside
    shard.write_bytes(bytes(damaged))
    out = dataset["root"] / "c.zarr"
    result = cli(*cache_args(dataset, out), expect_exit=1)
    assert "shard shard-000001.tar changed since the manifest was built" in result.output
    assert not out.exists()  # refused by the shard check, before the teacher loads

    shard.write_bytes(original)  # repaired: the rerun finishes the job
    cli(*cache_args(dataset, out))
    cli("cache", "verify", out, "--manifest", dataset["manifest"])


def test_rerun_redoes_a_half_written_shard(dataset):
    clean, resumed = dataset["root"] / "clean.zarr", dataset["root"] / "resumed.zarr"
    cli(*cache_args(dataset, clean, "--views", "2"))
    cli(*cache_args(dataset, resumed, "--views", "2"))
    # Make shard 1 look like a run died while writing it: arrays partly there, no marker.
    group = resumed / "shards" / "000001"
    meta = json.loads((group / "zarr.json").read_text())
    meta["attributes"] = {"complete": False}
    (group / "zarr.json").write_text(json.dumps(meta))
    import shutil

    shutil.rmtree(group / "topk_logit")
    assert TeacherCache.open(resumed).incomplete_shards() == [1]
    cli(*cache_args(dataset, resumed, "--views", "2"))
    assert dump(resumed) == dump(clean)


def test_second_writer_is_refused(dataset):
    out = dataset["root"] / "c.zarr"
    with exclusive_writer(out):
        result = cli(*cache_args(dataset, out), expect_exit=1)
    assert "is being written by pid" in result.output
    cli(*cache_args(dataset, out))  # the lock went with its holder


def test_killed_run_resumes_to_the_same_cache(tmp_path):
    write_shards(tmp_path / "d", num_shards=8, per_shard=10)
    classes, templates = write_lists(tmp_path)
    cli("manifest", str(tmp_path / "d" / "*.tar"), "--out", tmp_path / "m.json")
    data = {"manifest": tmp_path / "m.json", "classes": classes, "templates": templates}
    clean, killed = tmp_path / "clean.zarr", tmp_path / "killed.zarr"
    cli(*cache_args(data, clean, "--views", "4", "--batch-size", "4"))

    args = [BIN / "dho-pipeline", *cache_args(data, killed, "--views", "4", "--batch-size", "4")]
    process = subprocess.Popen([str(a) for a in args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    timings = tmp_path / "killed.zarr.timings.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if timings.exists() and timings.read_text().count("\n") >= 2:
            break
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    cli(*cache_args(data, killed, "--views", "4", "--batch-size", "4"))
    cli("cache", "verify", killed, "--manifest", data["manifest"])
    a, b = dump(clean), dump(killed)
    assert [(r["key"], [(v["box"], v["flip"]) for v in r["views"]]) for r in a] == \
           [(r["key"], [(v["box"], v["flip"]) for v in r["views"]]) for r in b]
    for x, y in zip(a, b):
        for vx, vy in zip(x["views"], y["views"]):
            assert np.allclose(vx["topk_logit"], vy["topk_logit"], atol=0.02)


@pytest.mark.slow
def test_two_processes_build_the_same_cache(dataset):
    one, two = dataset["root"] / "one.zarr", dataset["root"] / "two.zarr"
    cli(*cache_args(dataset, one, "--views", "3"))
    run_command(BIN / "torchrun", "--nproc_per_node", "2", "--no-python", BIN / "dho-pipeline",
                *cache_args(dataset, two, "--views", "3"), env={"OMP_NUM_THREADS": "1"})
    lines = (dataset["root"] / "two.zarr.timings.jsonl").read_text().splitlines()
    assert {json.loads(line)["rank"] for line in lines} == {0, 1}
    cli("cache", "verify", two, "--manifest", dataset["manifest"])
    a, b = dump(one), dump(two)
    assert [r["key"] for r in a] == [r["key"] for r in b]
    for x, y in zip(a, b):
        for vx, vy in zip(x["views"], y["views"]):
            assert vx["box"] == vy["box"] and vx["flip"] == vy["flip"]
            assert np.allclose(vx["topk_logit"], vy["topk_logit"], atol=0.02)
            assert np.allclose(list(vx["log_partition"].values()), list(vy["log_partition"].values()), atol=1e-3)


@pytest.mark.slow
def test_real_dfn5b_architecture_caches_an_image(tmp_path):
    """The default teacher's real architecture (random weights): every step but the download."""
    write_shards(tmp_path / "d", num_shards=1, per_shard=1, num_classes=2)
    classes, templates = write_lists(tmp_path, classnames=["cat", "dog"], templates=["a photo of a {}."])
    cli("manifest", tmp_path / "d" / "shard-000000.tar", "--out", tmp_path / "m.json")
    out = tmp_path / "h.zarr"
    cli("cache-teacher", "--manifest", tmp_path / "m.json", "--out", out, "--pretrained", "none",
        "--classnames", classes, "--templates", templates, "--topk", "all", "--workers", "0")
    spec = TeacherCache.open(out).spec
    assert spec.teacher["model"] == "ViT-H-14-378-quickgelu"
    assert spec.preprocess["image_size"] == [378, 378] and spec.preprocess["resize_mode"] == "squash"
    assert spec.views["view0"] == "whole"
    record = dump(out)[0]
    assert record["views"][0]["box"] == [0.0, 0.0, 1.0, 1.0]
    assert np.isfinite(record["views"][0]["topk_logit"]).all()


def test_compiled_teacher_writes_the_same_cache(dataset):
    """--compile (the GPU default): short last batches are padded, so the logits equal the eager run's."""
    eager, compiled = dataset["root"] / "eager.zarr", dataset["root"] / "compiled.zarr"
    cli(*cache_args(dataset, eager, "--views", "2", "--batch-size", "5", "--no-compile"))  # 2 images per batch
    cli(*cache_args(dataset, compiled, "--views", "2", "--batch-size", "5", "--compile"))
    for a, b in zip(dump(eager), dump(compiled), strict=True):
        for view_a, view_b in zip(a["views"], b["views"], strict=True):
            assert view_a["topk_index"] == view_b["topk_index"]
            np.testing.assert_allclose(view_a["topk_logit"], view_b["topk_logit"], atol=1e-3)
            np.testing.assert_allclose(view_a["log_partition"]["2"], view_b["log_partition"]["2"], atol=1e-4)


def test_refusal_names_a_writer_that_has_only_just_locked(tmp_path):
    """The holder writes who it is just after taking the lock; a second writer arriving in between waits
    a moment for that line instead of saying "another process"."""
    import fcntl
    import threading

    from dho_pipeline.cache_store import exclusive_writer
    from dho_pipeline.errors import UserError

    cache = tmp_path / "c.zarr"
    with open(str(cache) + ".lock", "a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # locked, not yet signed

        def sign():
            holder.write("pid 4242 on testhost since now\n")
            holder.flush()

        threading.Timer(0.2, sign).start()
        with pytest.raises(UserError, match="being written by pid 4242 on testhost"):
            with exclusive_writer(cache):
                pass
