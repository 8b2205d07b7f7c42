"""Stage one end to end on generated shards with a tiny open_clip teacher."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from helpers import (
    BIN, CLASSNAMES, TEMPLATES, cache_args, cli, dump, image_bytes, openai_normalized, random_image, run_command,
    write_lists, write_shards,
)
from PIL import Image

import dho_pipeline
from dho_pipeline.cache_store import TeacherCache
from dho_pipeline.manifest import load_manifest
from dho_pipeline.views import decode_rgb, render_view

# ---- the teacher computed in the test from open_clip alone (no dho_pipeline teacher code) ----------



def open_clip_test_vit(dtype=torch.float32):
    """`--teacher dho-test-vit --pretrained none`, built with open_clip directly: load_clip seeds random
    init with torch.manual_seed(0) (its default seed) right before open_clip.create_model."""
    import open_clip

    open_clip.add_model_config(Path(dho_pipeline.__file__).parent / "model_configs" / "dho-test-vit.json")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model("dho-test-vit")
    model.visual.to(dtype)
    return model.eval(), open_clip.get_tokenizer("dho-test-vit")


def text_embeddings(model, tokenizer, classnames, templates) -> torch.Tensor:
    """encode_text of every filled template, raw: [classes, templates, dim]."""
    texts = [template.replace("{}", name) for name in classnames for template in templates]
    with torch.no_grad():
        return model.encode_text(tokenizer(texts)).view(len(classnames), len(templates), -1).float()


def image_embeddings(model, pixels: np.ndarray) -> torch.Tensor:
    """encode_image of uint8 [N, H, W, 3] pixels, normalised with the OpenAI mean/std."""
    x = openai_normalized(pixels)  # dho-test-vit's mean/std
    dtype = next(model.visual.parameters()).dtype
    with torch.no_grad():
        return model.encode_image(x.to(dtype)).float()


def zero_shot_logits(images: torch.Tensor, texts: torch.Tensor, *, scale=100.0, per_template_norm=True,
                     renormalise=True) -> torch.Tensor:
    """The DHO teacher: 100 * cos(image, class), a class being the mean of its L2-normalised template
    embeddings, renormalised. The keyword arguments exist to show that the tests tell each step apart."""
    per_template = F.normalize(texts, dim=-1) if per_template_norm else texts
    classes = per_template.mean(dim=1)
    if renormalise:
        classes = F.normalize(classes, dim=-1)
    return scale * F.normalize(images, dim=-1) @ classes.T


def open_clip_teacher(classnames, templates):
    """uint8 pixels [N, H, W, 3] -> the teacher's full fp32 logits [N, classes], from open_clip alone."""
    model, tokenizer = open_clip_test_vit()
    texts = text_embeddings(model, tokenizer, classnames, templates)
    return lambda pixels: zero_shot_logits(image_embeddings(model, pixels), texts)


def float16_ulp(values) -> np.ndarray:
    """One float16 step at each value: what storing an fp32 logit as float16 may change it by."""
    return np.spacing(np.abs(np.asarray(values, dtype=np.float16)))


def assert_same_cached_views(a: list[dict], b: list[dict]) -> None:
    """Two dumps of one cache built two ways: same views, same top-k, logits equal up to float16 rounding."""
    assert [r["key"] for r in a] == [r["key"] for r in b]
    for x, y in zip(a, b, strict=True):
        for vx, vy in zip(x["views"], y["views"], strict=True):
            assert vx["box"] == vy["box"] and vx["flip"] == vy["flip"]
            assert vx["topk_index"] == vy["topk_index"]
            assert np.all(np.abs(np.subtract(vx["topk_logit"], vy["topk_logit"])) <= float16_ulp(vx["topk_logit"]))
            assert vx["log_partition"] == pytest.approx(vy["log_partition"], abs=1e-4)


CLASSES8 = ["cat", "dog", "bird", "fish", "frog", "horse", "ship", "truck"]
TEMPLATES3 = ["a photo of a {}.", "art of the {}.", "a blurry photo of the {}."]
# (width, height) with an even difference, so the centred square has whole-pixel edges and the test can
# cut it out with a plain PIL crop; wide and tall ones, so that swapping x and y changes the view.
EVEN_SIZES = [(64, 40), (40, 64), (50, 30), (36, 36), (30, 72), (90, 44)]


def centre_square_dataset(root: Path) -> dict:
    """One shard of lossless images of EVEN_SIZES, 8 classes x 3 templates; also returns the images."""
    rng = np.random.default_rng(0)
    images = [random_image(rng, w, h) for w, h in EVEN_SIZES]
    (root / "d").mkdir(parents=True)
    with wds.TarWriter(str(root / "d" / "e-000000.tar")) as writer:
        for i, image in enumerate(images):
            writer.write({"__key__": f"img{i}", "png": image_bytes(image, "PNG"), "cls": i % 8})
    classes, templates = write_lists(root, classnames=CLASSES8, templates=TEMPLATES3)
    cli("manifest", root / "d" / "e-000000.tar", "--out", root / "m.json")
    return {"manifest": root / "m.json", "classes": classes, "templates": templates, "images": images}


def centre_square_pixels(images, size=32) -> np.ndarray:
    """View 0 of a shortest-side teacher, written out: cut the centred square, bicubic resize."""
    views = []
    for image in images:
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        square = image.crop((left, top, left + side, top + side))
        views.append(np.asarray(square.resize((size, size), Image.Resampling.BICUBIC)))
    return np.stack(views)


def test_cached_logits_equal_open_clips_computed_in_the_test(tmp_path):
    """The teacher-logit formula checked against open_clip alone: view 0 (the centred square) cut and
    resized with PIL here, encode_image / encode_text, the formula written out in zero_shot_logits."""
    data = centre_square_dataset(tmp_path)
    out = tmp_path / "c.zarr"
    cli(*cache_args(data, out, "--topk", "3", "--temperatures", "1,2,4"))
    report = json.loads(cli("cache", "info", out, "--json").stdout)
    assert report["preprocess"]["image_size"] == [32, 32] and report["views"]["view0"] == "center-square"
    records = dump(out)
    assert [r["key"] for r in records] == [f"img{i}" for i in range(len(EVEN_SIZES))]

    model, tokenizer = open_clip_test_vit()
    texts = text_embeddings(model, tokenizer, CLASSES8, TEMPLATES3)
    pixels = centre_square_pixels(data["images"])
    images = image_embeddings(model, pixels)
    expected = zero_shot_logits(images, texts)
    for record, logits, (width, height) in zip(records, expected, EVEN_SIZES):
        view = record["views"][0]
        side = min(width, height)
        box = [(width - side) / 2 / width, (height - side) / 2 / height, (width + side) / 2 / width, (height + side) / 2 / height]
        assert view["box"] == pytest.approx(box, abs=1e-5) and view["flip"] is False
        top = logits.topk(3)
        assert view["topk_index"] == top.indices.tolist()
        assert np.all(np.abs(view["topk_logit"] - top.values.numpy()) <= float16_ulp(view["topk_logit"]))
        for t in ("1", "2", "4"):
            assert view["log_partition"][t] == pytest.approx(torch.logsumexp(logits / float(t), 0).item(), abs=1e-4)

    # The comparison tells the formula apart from its usual mistakes: each misses the cache by far more
    # than float16 rounding.
    cached = torch.tensor([r["views"][0]["topk_logit"] for r in records])
    index = torch.tensor([r["views"][0]["topk_index"] for r in records])
    tolerance = float16_ulp(cached.numpy()).max()
    wrong = {
        "no renormalisation": zero_shot_logits(images, texts, renormalise=False),
        "no per-template normalisation": zero_shot_logits(images, texts, per_template_norm=False),
        "the model's logit_scale": zero_shot_logits(images, texts, scale=model.logit_scale.exp().item()),
        "x and y swapped": zero_shot_logits(image_embeddings(model, pixels.transpose(0, 2, 1, 3)), texts),
    }
    for name, logits in wrong.items():
        gap = (logits.gather(1, index) - cached).abs().max().item()
        assert gap > 20 * tolerance, (name, gap, tolerance)


def test_every_view_holds_the_topk_and_log_partitions_of_its_stored_box(dataset):
    """Each cached view's logits are the teacher's on the pixels of its stored box and flip (rendered
    with render_view, which test_view_convention_round_trip checks against torchvision)."""
    out = dataset["root"] / "c.zarr"
    result = cli(*cache_args(dataset, out, "--views", "3", "--topk", "3", "--temperatures", "1,2,4"))
    assert "complete" in result.output
    cli("cache", "verify", out, "--manifest", dataset["manifest"])

    records = dump(out)
    manifest_keys = [s.keys for s in load_manifest(dataset["manifest"]).shards]
    assert [r["key"] for r in records] == [k for keys in manifest_keys for k in keys]
    logits_of = open_clip_teacher(CLASSNAMES, TEMPLATES)  # the lists `dataset` wrote
    for shard_path in dataset["shards"]:
        for sample in wds.WebDataset(str(shard_path), shardshuffle=False):
            record = next(r for r in records if r["key"] == sample["__key__"])
            assert set(record) == {"shard", "key", "views"} and len(record["views"]) == 3
            image = decode_rgb(sample["jpg"])
            pixels = np.stack([
                render_view(image, np.round(np.array(v["box"]) * 65535).astype(np.uint16), v["flip"], (32, 32))
                for v in record["views"]
            ])
            for view, logits in zip(record["views"], logits_of(pixels)):
                top = logits.topk(3)
                assert view["topk_index"] == top.indices.tolist()
                assert np.all(np.abs(view["topk_logit"] - top.values.numpy()) <= float16_ulp(view["topk_logit"]))
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
    assert attrs["teacher"] == {"model": "dho-test-vit", "pretrained": "none", "weights_fingerprint": "random-init:seed=0"}
    assert attrs["classnames"] == CLASSNAMES and attrs["templates"] == TEMPLATES
    assert attrs["manifest_fingerprint"] == load_manifest(dataset["manifest"]).fingerprint
    assert attrs["topk"] == 5 and attrs["temperatures"] == [1.0, 2.0]  # --topk 100 keeps all 5 classes
    assert attrs["views"]["seed"] == 7 and attrs["views"]["num_views"] == 2
    assert attrs["preprocess"]["resize_mode"] == "shortest" and attrs["views"]["view0"] == "center-square"
    assert attrs["status"]["complete"] is True
    # The same command with another setting is refused instead of mixing two caches.
    result = cli(*cache_args(dataset, out, "--views", "2", "--seed", "8"), expect_exit=1)
    assert "different views" in result.output


def test_bf16_teacher_keeps_fp32_logits(tmp_path):
    """--precision bf16 (the GPU default) runs the image tower in bf16 but the classifier in fp32: the
    cache stores float32 log-partitions and float16 top-k logits (docs/cache-format.md), and they equal a
    bf16 tower followed by an fp32 classifier computed here, closer than bf16 rounding of the logits allows."""
    import zarr

    data = centre_square_dataset(tmp_path)
    bf16 = tmp_path / "bf16.zarr"
    cli(*cache_args(data, bf16, "--precision", "bf16", "--topk", "3", "--temperatures", "1,2,4"))
    cli("cache", "verify", bf16, "--manifest", data["manifest"])
    shard = zarr.open_group(str(bf16), mode="r")["shards/000000"]
    assert shard["log_partition"].dtype == np.float32 and shard["topk_logit"].dtype == np.float16

    cached = np.array([[r["views"][0]["log_partition"][t] for t in ("1", "2", "4")] for r in dump(bf16)])
    pixels = centre_square_pixels(data["images"])

    def log_partitions(model, classifier_dtype):
        texts = text_embeddings(model, tokenizer, CLASSES8, TEMPLATES3)
        images = image_embeddings(model, pixels)  # in the tower's own dtype, returned as fp32
        logits = zero_shot_logits(images.to(classifier_dtype), texts.to(classifier_dtype)).float()
        return np.array([[torch.logsumexp(row / t, 0).item() for t in (1.0, 2.0, 4.0)] for row in logits])

    model, tokenizer = open_clip_test_vit(torch.bfloat16)
    assert np.abs(cached - log_partitions(model, torch.float32)).max() < 1e-4
    # Logits rounded to bf16 (an autocast classifier), or an fp32 tower (--precision ignored), miss by far more.
    assert np.abs(cached - log_partitions(model, torch.bfloat16)).max() > 1e-2
    assert np.abs(cached - log_partitions(open_clip_test_vit()[0], torch.float32)).max() > 1e-2


def test_resize_override_changes_view0(tmp_path):
    """dho-test-vit resizes the shortest side (view 0: the centred square); --resize squash makes view 0
    the whole image, squashed to 32 x 32, and the logits are those of the squashed image."""
    data = centre_square_dataset(tmp_path)
    default, squash = tmp_path / "default.zarr", tmp_path / "squash.zarr"
    cli(*cache_args(data, default, "--topk", "all"))
    cli(*cache_args(data, squash, "--resize", "squash", "--topk", "all"))
    report = json.loads(cli("cache", "info", squash, "--json").stdout)
    assert report["preprocess"]["resize_mode"] == "squash" and report["views"]["view0"] == "whole"
    boxes = {name: [r["views"][0]["box"] for r in dump(path)] for name, path in [("default", default), ("squash", squash)]}
    assert all(box == [0.0, 0.0, 1.0, 1.0] for box in boxes["squash"])
    assert sum(box != [0.0, 0.0, 1.0, 1.0] for box in boxes["default"]) == 5  # all but the square image
    logits_of = open_clip_teacher(CLASSES8, TEMPLATES3)
    squashed = np.stack([np.asarray(image.resize((32, 32), Image.Resampling.BICUBIC)) for image in data["images"]])
    for record, logits in zip(dump(squash), logits_of(squashed)):
        cached = np.array(record["views"][0]["topk_logit"])[np.argsort(record["views"][0]["topk_index"])]
        assert np.all(np.abs(cached - logits.numpy()) <= float16_ulp(cached))


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
    logits_of = open_clip_teacher(CLASSNAMES, TEMPLATES)

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


def one_line_error(result) -> str:
    """The output of a refused command: a single `Error: ...` line, no traceback."""
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_bad_inputs_give_one_line_errors(dataset, tmp_path):
    # A missing shard fails before the teacher is loaded (the default teacher's weights are not here).
    moved = dataset["shards"][1].with_suffix(".moved")
    dataset["shards"][1].rename(moved)
    result = cli("cache-teacher", "--manifest", dataset["manifest"], "--out", tmp_path / "x.zarr", expect_exit=1)
    assert "shard shard-000001.tar is missing" in one_line_error(result)
    moved.rename(dataset["shards"][1])

    # A label outside the class list names the shard and the key.
    classes, _ = write_lists(tmp_path / "few", classnames=["a", "b"])
    result = cli(*cache_args({**dataset, "classes": classes}, tmp_path / "y.zarr"), expect_exit=1)
    assert "shard shard-000000.tar, key 's0_img0000': label 4 is outside the class list" in one_line_error(result)

    # Unknown teacher, unreadable class list, templates without {}.
    result = cli(*cache_args(dataset, tmp_path / "z.zarr", "--teacher", "ViT-Q-99"), expect_exit=1)
    assert "unknown open_clip model 'ViT-Q-99'" in one_line_error(result)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    result = cli(*cache_args({**dataset, "classes": tmp_path / "latin1.txt"}, tmp_path / "z.zarr"), expect_exit=1)
    assert "latin1.txt is not UTF-8 text" in one_line_error(result)
    (tmp_path / "bad-templates.txt").write_text("a photo\n")
    result = cli(*cache_args({**dataset, "templates": tmp_path / "bad-templates.txt"}, tmp_path / "z.zarr"), expect_exit=1)
    assert "bad-templates.txt: entry 1 ('a photo') must contain exactly one '{}'" in one_line_error(result)
    result = cli(*cache_args(dataset, tmp_path / "z.zarr", "--topk", "many"), expect_exit=2)  # click's usage error
    assert "Invalid value for '--topk': 'many' is neither a number nor 'all'" in result.output
    assert not any((tmp_path / name).exists() for name in ("x.zarr", "y.zarr", "z.zarr"))


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


@pytest.mark.slow
def test_two_processes_build_the_same_cache(dataset):
    one, two = dataset["root"] / "one.zarr", dataset["root"] / "two.zarr"
    cli(*cache_args(dataset, one, "--views", "3"))
    run_command(BIN / "torchrun", "--nproc_per_node", "2", "--no-python", BIN / "dho-pipeline",
                *cache_args(dataset, two, "--views", "3"), env={"OMP_NUM_THREADS": "1"})
    lines = (dataset["root"] / "two.zarr.timings.jsonl").read_text().splitlines()
    assert {json.loads(line)["rank"] for line in lines} == {0, 1}
    cli("cache", "verify", two, "--manifest", dataset["manifest"])
    assert_same_cached_views(dump(one), dump(two))


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
    from torch._dynamo.utils import counters

    eager, compiled = dataset["root"] / "eager.zarr", dataset["root"] / "compiled.zarr"
    torch._dynamo.reset()  # forget graphs compiled by earlier tests, which dynamo would reuse
    graphs = counters["stats"]["unique_graphs"]
    # 8 views per call = 4 images: each shard of 6 ends in a short batch of 2, which the compiled run pads.
    cli(*cache_args(dataset, eager, "--views", "2", "--batch-size", "8", "--no-compile"))
    assert counters["stats"]["unique_graphs"] == graphs
    cli(*cache_args(dataset, compiled, "--views", "2", "--batch-size", "8", "--compile"))
    assert counters["stats"]["unique_graphs"] == graphs + 1  # compiled once: padded short batches reuse the graph
    assert_same_cached_views(dump(eager), dump(compiled))


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
