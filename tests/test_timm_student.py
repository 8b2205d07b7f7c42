"""Students from timm (`--student timm:NAME`): trained against a cache, resumed, calibrated, evaluated,
predicted and exported with both head kinds; built from local weights; a missing download fails fast."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import BIN, cli, image_bytes, random_image, run_command, training_data
from PIL import Image
from safetensors.torch import load_file, save_file

from dho_pipeline.backbones import build_backbone
from dho_pipeline.clip_models import Preprocess
from dho_pipeline.student_checkpoint import StudentMetadata

STUDENT = "test_convnext"  # 207k parameters, 160 px, mean = std = 0.5, bicubic, crop_pct 0.95 (timm's config)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return training_data(tmp_path_factory.mktemp("timm"), num_shards=2, per_shard=12, eval_per_shard=6)


def train_args(data, out, *extra):
    return [
        "train", "--cache", data["cache"], "--manifest", data["manifest"], "--split", data["split"], "--out", out,
        "--student", f"timm:{STUDENT}", "--pretrained", "none", "--batch-size", "4", "--lr", "1e-3", "--epochs", "1",
        "--workers", "0", "--log-every", "1", *extra,
    ]


def by_hand(checkpoint: dict, image: Image.Image, head: str) -> torch.Tensor:
    """The mixed probabilities computed without dho-pipeline: timm's model, timm's data config (centre crop of
    crop_pct of the shorter side, resize to 160 bicubic, mean/std 0.5), the heads written out."""
    weights = checkpoint["model_state_dict"]
    model = timm.create_model(STUDENT, num_classes=0)
    model.load_state_dict({k[len("backbone."):]: v for k, v in weights.items() if k.startswith("backbone.")})
    model.eval()
    config = timm.data.resolve_model_data_config(model)
    width, height = image.size
    side = min(width, height) * config["crop_pct"]
    box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    size = config["input_size"][1:]
    pixels = np.asarray(image.crop(box).resize((size[1], size[0]), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    x = (torch.from_numpy(pixels).permute(2, 0, 1)[None] - torch.tensor(config["mean"])[:, None, None]) \
        / torch.tensor(config["std"])[:, None, None]
    with torch.no_grad():
        f = model(x)
    ce = f @ weights["ce_head.weight"].T + weights["ce_head.bias"]
    if head == "cosine":
        kd = 100 * (F.normalize(f, dim=-1) @ weights["kd_head.weight"].T + weights["kd_head.bias"])
    else:
        kd = f @ weights["kd_head.weight"].T + weights["kd_head.bias"]
    alpha, beta = checkpoint["alpha"], checkpoint["beta"]
    return (alpha * F.softmax(ce, -1) + (1 - alpha) * F.softmax(kd / beta, -1))[0]


@pytest.mark.slow
@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_a_timm_student_through_every_stage(prepared, tmp_path, head):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    # Trained a few steps (24 images: 5 labeled, 5 held out, 14 unlabeled // 4 = 3 steps), and the same
    # run stopped after 2 and resumed.
    cli(*train_args(prepared, whole, "--head", head))
    cli(*train_args(prepared, parts, "--head", head, "--max-steps", "2", "--checkpoint-every", "2"))
    cli(*train_args(prepared, parts, "--head", head, "--resume"))
    a = torch.load(whole / "student.pt", weights_only=True)
    b = torch.load(parts / "student.pt", weights_only=True)
    assert a["model_state_dict"].keys() == b["model_state_dict"].keys()
    assert all(torch.allclose(a["model_state_dict"][k], b["model_state_dict"][k], atol=1e-6) for k in a["model_state_dict"])
    losses = [json.loads(line)["loss"] for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(np.isfinite(losses))

    # The released keys; the family, head and timm's preprocessing in the metadata.
    keys = set(a["model_state_dict"])
    assert {"ce_head.weight", "ce_head.bias", "kd_head.weight", "kd_head.bias"} <= keys
    assert all(k.startswith(("backbone.", "ce_head.", "kd_head.")) for k in keys)
    student = a["dho_pipeline"]["student"]
    assert (student["family"], student["model"], student["head"]) == ("timm", STUDENT, head)
    assert student["preprocess"] == {"image_size": [160, 160], "resize_mode": "shortest", "interpolation": "bicubic",
                                     "mean": [0.5] * 3, "std": [0.5] * 3, "crop_fraction": 0.95}

    # calibrate on the split's held-out images, evaluate, predict, export: unchanged commands.
    calibrated = tmp_path / "calibrated.pt"
    cli("calibrate", "--checkpoint", whole / "student.pt", "--data", prepared["manifest"], "--split", prepared["split"],
        "--out", calibrated, "--workers", "0")
    report = json.loads(cli("evaluate", "--checkpoint", calibrated, "--data", prepared["eval"], "--workers", "0",
                            "--json").output)
    assert report["samples"] == 6 and report["architecture"] == f"timm:{STUDENT}"
    checkpoint = torch.load(calibrated, weights_only=True)
    assert (report["alpha"], report["beta"]) == (checkpoint["alpha"], checkpoint["beta"])

    image = random_image(np.random.default_rng(3), 200, 120)  # 0.95 x 120 = 114 px: a whole-pixel centred square
    (tmp_path / "photo.png").write_bytes(image_bytes(image, "PNG"))
    predictions = json.loads(cli("predict", "--checkpoint", calibrated, tmp_path / "photo.png", "--topk", "5",
                                 "--json").output)[0]["predictions"]
    expected = by_hand(checkpoint, image, head)
    assert [p["class"] for p in predictions] == expected.topk(5).indices.tolist()
    assert [p["probability"] for p in predictions] == pytest.approx(expected.topk(5).values.tolist(), abs=1e-5)

    cli("export", calibrated, "--out", tmp_path / "student.safetensors")
    exported = load_file(tmp_path / "student.safetensors")
    assert all(torch.equal(exported[k], checkpoint["model_state_dict"][k]) for k in checkpoint["model_state_dict"])
    description = json.loads((tmp_path / "student.json").read_text())
    assert description["architecture"] == f"timm:{STUDENT}" and description["head"] == head
    assert description["preprocess"]["crop_fraction"] == 0.95

    if head == "linear":  # a released-format file (no metadata) of a timm student, named by --student
        bare = tmp_path / "released.pt"
        torch.save({k: v for k, v in checkpoint.items() if k != "dho_pipeline"}, bare)
        cli("export", bare, "--student", f"timm:{STUDENT}", "--classnames", prepared["classes"],
            "--out", tmp_path / "bare.safetensors")
        from dho_pipeline import load_student

        reloaded = load_student(tmp_path / "bare.safetensors")  # alone: the export records family and head
        assert json.loads((tmp_path / "bare.json").read_text())["head"] == "linear"
        assert torch.allclose(reloaded.predict([image])[0], by_hand(checkpoint, image, head), atol=1e-5)


def test_heads_of_a_timm_student_start_as_nn_linear_does(prepared, tmp_path):
    """No text tower: default nn.Linear initialisation; a cosine head's KD bias zeroed (it is scaled by 100)."""
    for head in ("linear", "cosine"):
        out = tmp_path / head
        cli(*train_args(prepared, out, "--head", head, "--max-steps", "1", "--lr", "1e-12", "--eval-crop", "1"))
        checkpoint = torch.load(out / "student.pt", weights_only=True)
        weights = checkpoint["model_state_dict"]
        bound = 1 / 64 ** 0.5  # nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in)), in = 64 features
        for name in ("ce_head.weight", "kd_head.weight", "ce_head.bias"):
            assert weights[name].abs().max() <= bound + 1e-6 and weights[name].std() > bound / 4, name
        # One AdamW step at lr 1e-12 moves a weight by about 1e-12.
        assert (weights["kd_head.bias"].abs().max() < 1e-9) == (head == "cosine")
        assert checkpoint["dho_pipeline"]["student"]["preprocess"].get("crop_fraction", 1.0) == 1.0  # --eval-crop 1


def test_backbone_from_a_local_weights_file(tmp_path):
    """A timm checkpoint with its classifier (safetensors or .pth): the classifier is dropped, the rest loaded."""
    torch.manual_seed(7)
    reference = timm.create_model(STUDENT, num_classes=1000)
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pth")
    for path in (tmp_path / "w.safetensors", tmp_path / "w.pth"):
        backbone = build_backbone(f"timm:{STUDENT}", str(path))
        loaded = backbone.module.state_dict()
        assert loaded and all(torch.equal(loaded[k], state[k]) for k in loaded)
        assert backbone.feature_dim == 64 and backbone.spec.name == STUDENT
        assert backbone.weights_fingerprint.startswith("sha256:")
    # Weights of another architecture: one line naming both.
    from dho_pipeline.errors import UserError

    with pytest.raises(UserError, match=r"w.safetensors does not fit timm:test_resnet \(\d+ missing, \d+ unexpected"):
        build_backbone("timm:test_resnet", str(tmp_path / "w.safetensors"))
    with pytest.raises(UserError, match="unknown timm model 'test_convnxt'.*did you mean test_convnext"):
        build_backbone("timm:test_convnxt", "none")
    with pytest.raises(UserError, match="neither a file nor a timm tag of test_convnext .known tags: r160_in1k"):
        build_backbone(f"timm:{STUDENT}", "no_such_tag")


@pytest.mark.slow
def test_a_missing_download_is_a_fast_one_line_error(prepared, tmp_path):
    """No weights in the (empty) Hugging Face cache and no hub: refused at once, saying how to pass a file."""
    started = time.monotonic()
    result = run_command(BIN / "dho-pipeline", *train_args(prepared, tmp_path / "run"),
                         "--pretrained", "r160_in1k", check=False,
                         env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert time.monotonic() - started < 60
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert ("weights for timm:test_convnext.r160_in1k are not in the Hugging Face cache and HF_HUB_OFFLINE is set"
            in result.stderr)
    assert "`hf download timm/test_convnext.r160_in1k model.safetensors`" in result.stderr
    assert "--pretrained /path/to/the/file" in result.stderr


def test_checkpoint_metadata_written_before_families_loads_as_open_clip_cosine():
    payload = {
        "format": "dho-pipeline-student", "version": 1,
        "student": {"model": "dho-tiny-student", "pretrained": "none",
                    "preprocess": {"image_size": [32, 32], "resize_mode": "shortest", "interpolation": "bicubic",
                                   "mean": [0.5] * 3, "std": [0.5] * 3}},
        "classnames": ["a"], "templates": ["{}"], "config": {}, "cache_fingerprint": None, "manifest_fingerprint": "m",
        "split_fingerprint": "s", "steps": 1, "finished": True, "labeled_keys": [], "calibrated_on": None,
    }
    metadata = StudentMetadata.from_payload(payload, "old.pt")
    assert (metadata.family, metadata.head, metadata.preprocess.crop_fraction) == ("open_clip", "cosine", 1.0)
    assert metadata.to_payload()["student"]["preprocess"] == payload["student"]["preprocess"]  # no new key at 1.0
    assert Preprocess.from_json(payload["student"]["preprocess"]).to_json() == payload["student"]["preprocess"]
