"""Odd pixels: 16-bit PNGs (greyscale, greyscale with alpha, RGB) become the 8-bit image that keeps each
sample's high byte, in every stage: the teacher's cache, the student's training views and `predict` see
exactly what they see for the 8-bit PNG of the same picture. (Pillow's own conversion of 16-bit
greyscale clipped every value above 255 to white.) EXIF orientation is ignored everywhere alike: there
is one decode function, views.decode_rgb."""

from __future__ import annotations

import json
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from fault_helpers import (  # noqa: F401  (one_torch_thread is an autouse fixture)
    CLASSNAMES, REPO, cache_args, dump_records, invoke, label, one_torch_thread, write_lists, write_tar,
)
from helpers import image_bytes
from PIL import Image

from dho_pipeline.views import decode_rgb

WIDTH, HEIGHT = 40, 28


def png16(samples: np.ndarray) -> bytes:
    """A 16-bit PNG of `samples` (uint16 [H, W] grey, [H, W, 2] grey + alpha, [H, W, 3] RGB). Pillow
    writes no 16-bit colour PNGs, so this writes the chunks itself."""
    color_type = {2: 0, 3: {2: 4, 3: 2}.get(samples.shape[-1])}[samples.ndim]
    height, width = samples.shape[:2]
    rows = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def png8(samples: np.ndarray) -> bytes:
    """The same picture as an 8-bit PNG: each sample's high byte."""
    mode = {2: "L", 3: {2: "LA", 3: "RGB"}.get(samples.shape[-1])}[samples.ndim]
    return image_bytes(Image.fromarray((samples >> 8).astype(np.uint8), mode), "PNG")


def pictures(seed: int = 0) -> dict[str, np.ndarray]:
    """Random 16-bit samples over the whole range (almost all far above 255), one picture per PNG kind."""
    rng = np.random.default_rng(seed)
    shapes = {"grey": (HEIGHT, WIDTH), "grey-alpha": (HEIGHT, WIDTH, 2), "rgb": (HEIGHT, WIDTH, 3),
              "grey-2": (HEIGHT, WIDTH)}
    return {kind: rng.integers(0, 65536, shape, dtype=np.uint16) for kind, shape in shapes.items()}


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """Two data sets of the same pictures, as 16-bit and as 8-bit PNGs: same shard names, keys, labels."""
    root = tmp_path_factory.mktemp("pixels")
    made = {}
    for depth, encode in (("16", png16), ("8", png8)):
        folder = root / f"png{depth}"
        members = []
        for number, (key, samples) in enumerate(pictures().items()):
            (folder / "files").mkdir(parents=True, exist_ok=True)
            (folder / "files" / f"{key}.png").write_bytes(encode(samples))
            members += [(f"{key}.png", encode(samples)), (f"{key}.cls", label(number % len(CLASSNAMES)))]
        shard = write_tar(folder / "shards" / "shard-000000.tar", members)
        classes, templates = write_lists(folder)
        assert invoke("manifest", shard, "--out", folder / "m.json").exit_code == 0
        data = {"manifest": folder / "m.json", "classes": classes, "templates": templates, "folder": folder}
        result = invoke(*cache_args(data, folder / "c.zarr", "--views", "3", "--topk", "5"))
        assert result.exit_code == 0, result.output
        made[depth] = {**data, "cache": folder / "c.zarr"}
    return made


def test_16_bit_png_decodes_to_its_high_byte():
    for kind, samples in pictures().items():
        decoded = np.asarray(decode_rgb(png16(samples)))
        grey = samples if samples.ndim == 2 else samples[..., 0] if samples.shape[-1] == 2 else None
        expected = np.repeat((grey >> 8)[..., None], 3, -1) if grey is not None else samples >> 8
        assert np.array_equal(decoded, expected.astype(np.uint8)), kind
        assert np.array_equal(decoded, np.asarray(decode_rgb(png8(samples)))), kind


def test_the_teacher_caches_a_16_bit_png_as_its_8_bit_twin(twins):
    sixteen, eight = dump_records(twins["16"]["cache"]), dump_records(twins["8"]["cache"])
    assert [r["key"] for r in sixteen] == [r["key"] for r in eight] == list(pictures())
    assert sixteen == eight, "the teacher saw other pixels in the 16-bit PNGs"


def test_training_views_of_a_16_bit_png_are_those_of_its_8_bit_twin(twins):
    """The student's data path in train: the labeled and unlabeled streams with their cached views."""
    from dho_pipeline.cache_reader import CacheReader
    from dho_pipeline.manifest import load_manifest
    from dho_pipeline.student_data import SampleTable, training_loaders

    batches = {}
    for depth, data in twins.items():
        manifest = load_manifest(data["manifest"])
        table = SampleTable.from_manifest(manifest)
        ids = np.arange(len(table.label))
        streams = training_loaders(table, ids[:2], ids[2:], image_size=(24, 24), micro_batch=2, seed=0, rank=0,
                                   world=1, positions={"labeled": 0, "unlabeled": 0}, workers=0,
                                   reader=CacheReader.open(data["cache"], manifest, 2.0))
        iterators = [iter(stream) for stream in streams.values()]
        batches[depth] = [next(iterator)["pixels"] for iterator in iterators for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(batches["16"], batches["8"]))
    assert all(not torch.all(pixels == 255) for pixels in batches["16"])


def test_predict_sees_a_16_bit_png_as_its_8_bit_twin(twins, tmp_path):
    from dho_pipeline.backbones import build_backbone
    from dho_pipeline.student import build_student
    from dho_pipeline.student_checkpoint import StudentCheckpoint

    student = build_student(build_backbone("dho-tiny-student", "none"), CLASSNAMES, ["a photo of a {}."],
                            device=torch.device("cpu"))
    checkpoint = tmp_path / "student.pt"
    StudentCheckpoint(state_dict=student.state_dict(), epoch=0, acc=None, alpha=0.5, beta=0.5, metadata=None
                      ).save(checkpoint)
    answers = {}
    for depth, data in twins.items():
        images = sorted((data["folder"] / "files").glob("*.png"))
        result = invoke("predict", "--checkpoint", checkpoint, "--student", "dho-tiny-student", "--classnames",
                        data["classes"], "--topk", "5", "--json", *images)
        assert result.exit_code == 0, result.output
        answers[depth] = [[(p["class"], p["probability"]) for p in r["predictions"]] for r in json.loads(result.output)]
    assert answers["16"] == answers["8"]


def test_exif_orientation_is_ignored_and_every_stage_decodes_through_one_function(tmp_path):
    """The documented choice (README "Pixels"): an image is used as its pixels are stored."""
    image = Image.fromarray(np.arange(40 * 28 * 3, dtype=np.uint8).reshape(28, 40, 3) % 251)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, format="JPEG", exif=exif, quality=95)
    assert Image.open(path).getexif()[0x0112] == 6
    assert decode_rgb(path.read_bytes()).size == (40, 28)  # not turned to 28 x 40
    openers = [f"{p.relative_to(REPO)}:{n}" for folder in ("dho_pipeline", "stages") for p in (REPO / folder).rglob("*.py")
               for n, line in enumerate(p.read_text().splitlines(), 1)
               if re.search(r"Image\.open\(", line) and "photo.jpg" not in line]  # not the usage examples shown to users
    assert [opener.split(":")[0] for opener in openers] == ["dho_pipeline/views.py"], openers
