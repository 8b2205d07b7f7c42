"""calibrate / evaluate / predict / export, released-checkpoint compatibility, and bad input."""

from __future__ import annotations

import importlib.util
import io
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from helpers import BIN, cached_dataset, cli, image_bytes, openai_normalized, random_image, run_command, write_lists
from PIL import Image
from torch import nn

from dho_pipeline.evaluation import best_point
from dho_pipeline.student_checkpoint import detect_architecture, load_student


# ---- a released-format checkpoint, built the model card's way with OpenAI's CLIP code ----------------


def openai_clip_model_module():
    """OpenAI's `clip/model.py` (PyPI openai-clip), loaded without its package __init__, which needs the
    long-gone pkg_resources and downloads nothing we want here."""
    spec = importlib.util.find_spec("clip")
    path = os.path.join(spec.submodule_search_locations[0], "model.py")
    module_spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


class CardStudentModel(nn.Module):
    """The model card's StudentModel; `clip.load` is replaced by OpenAI's CLIP class, random weights."""

    def __init__(self, num_classes=1000):
        super().__init__()
        clip_model = openai_clip_model_module().CLIP(512, 224, 12, 768, 16, 77, 49408, 512, 8, 12)  # ViT-B/16
        self.backbone = clip_model.float().visual
        self.ce_head = nn.Linear(512, num_classes)
        self.kd_head = nn.Linear(512, num_classes)

    def forward(self, x):
        features = self.backbone(x)
        return self.ce_head(features), self.kd_head(F.normalize(features, dim=1)) * 100


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    torch.manual_seed(0)
    model = CardStudentModel().eval()
    state = {f"module.{k}": v for k, v in model.state_dict().items()}  # as saved from DDP
    torch.save({"model_state_dict": state, "epoch": 31, "acc": 81.6, "alpha": 0.4, "beta": 1.25}, root / "vit_b_1.pt")
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(root / "val-000000.tar")) as writer:
        for i in range(6):
            writer.write({"__key__": f"val{i}", "jpg": image_bytes(random_image(rng, 300 + 20 * i, 240), "JPEG"),
                          "cls": int(rng.integers(0, 1000))})
    images = []
    for i in range(2):
        path = root / f"photo{i}.png"
        random_image(rng, 256, 320).save(path)
        images.append(path)
    return {"root": root, "model": model, "checkpoint": root / "vit_b_1.pt", "shard": root / "val-000000.tar",
            "images": images}


def card_probabilities(model, pixels: np.ndarray, alpha: float, beta: float) -> torch.Tensor:
    """The model card's inference code on already-preprocessed uint8 pixels."""
    x = openai_normalized(pixels)
    with torch.no_grad():
        ce_logits, kd_logits = model(x)
    return alpha * F.softmax(ce_logits, dim=1) + (1 - alpha) * F.softmax(kd_logits / beta, dim=1)


def student_view(image: Image.Image, size: int = 224) -> np.ndarray:
    from dho_pipeline.views import center_box, render_view

    return render_view(image, center_box(*image.size), False, (size, size))


def test_released_checkpoint_predicts_as_the_model_card_computes(released):
    result = cli("predict", "--checkpoint", released["checkpoint"], *released["images"], "--json", "--topk", "3")
    predictions = json.loads(result.stdout)
    pixels = np.stack([student_view(Image.open(p).convert("RGB")) for p in released["images"]])
    expected = card_probabilities(released["model"], pixels, 0.4, 1.25)
    for row, card in zip(predictions, expected):
        top = card.topk(3)
        assert [p["class"] for p in row["predictions"]] == top.indices.tolist()
        assert np.allclose([p["probability"] for p in row["predictions"]], top.values.numpy(), atol=1e-5)
        assert row["predictions"][0]["name"] == open("manifests/imagenet_classnames.txt").read().splitlines()[2 + top.indices[0]]
    # Our centre view is the usual CLIP preprocessing (resize shortest side, centre crop, bicubic).
    from torchvision.transforms import v2

    clip_preprocess = v2.Compose([v2.Resize(224, interpolation=v2.InterpolationMode.BICUBIC), v2.CenterCrop(224)])
    image = Image.open(released["images"][0]).convert("RGB")
    reference = np.asarray(clip_preprocess(image)).astype(int)
    assert np.abs(student_view(image).astype(int) - reference).mean() < 3


def test_released_checkpoint_evaluates_as_the_model_card_computes(released):
    report = json.loads(cli("evaluate", "--checkpoint", released["checkpoint"], "--data", released["shard"],
                            "--json", "--workers", "0").stdout)
    samples = list(wds.WebDataset(str(released["shard"]), shardshuffle=False))
    pixels = np.stack([student_view(Image.open(io.BytesIO(s["jpg"])).convert("RGB")) for s in samples])
    labels = torch.tensor([int(s["cls"]) for s in samples])
    card = card_probabilities(released["model"], pixels, 0.4, 1.25)
    assert report["samples"] == 6 and report["alpha"] == 0.4 and report["beta"] == 1.25
    assert report["mix"]["top1"] == pytest.approx((card.argmax(1) == labels).float().mean().item())
    in_top5 = (card.topk(5).indices == labels[:, None]).any(1).float().mean().item()
    assert report["mix"]["top5"] == pytest.approx(in_top5)
    nll = -torch.log(card.gather(1, labels[:, None])).mean().item()
    assert report["mix"]["nll"] == pytest.approx(nll, rel=1e-4)
    assert sum(report["per_class_total"]) == 6


def test_architecture_is_read_off_the_weights_and_quickgelu_matters(released):
    state = torch.load(released["checkpoint"], weights_only=True)["model_state_dict"]
    assert detect_architecture({k.replace("module.", ""): v for k, v in state.items()}) == "ViT-B-16"
    loaded = load_student(released["checkpoint"], student="ViT-B-16")
    assert loaded.architecture == "ViT-B-16-quickgelu"
    # open_clip's plain "ViT-B-16" (GELU) takes the same weights without complaint ...
    from dho_pipeline.clip_models import load_clip

    gelu = load_clip("ViT-B-16", "none").model.visual
    gelu.load_state_dict({k[len("backbone."):]: v for k, v in loaded.model.state_dict().items() if k.startswith("backbone.")})
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours, card = loaded.model.backbone(x), released["model"].backbone(x)
        wrong = gelu.eval()(x)
    assert torch.allclose(ours, card, atol=1e-4)
    assert (wrong - card).abs().max() > 10 * (ours - card).abs().max()  # ... and silently answers differently


def test_export_writes_safetensors_and_a_description(released, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "model.safetensors"
    cli("export", released["checkpoint"], "--format", "safetensors", "--out", out)
    weights = load_file(str(out))
    expected = released["model"].state_dict()
    assert set(weights) == set(expected) and all(torch.equal(weights[k], expected[k]) for k in expected)
    description = json.loads(out.with_suffix(".json").read_text())
    assert description["alpha"] == 0.4 and description["beta"] == 1.25 and len(description["classnames"]) == 1000
    assert description["architecture"] == "ViT-B-16-quickgelu"


# ---- calibration on our own runs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate")
    data = cached_dataset(root, num_shards=3, per_shard=20, cache_options=("--views", "2"),
                          split_options=("--percent", "20", "--holdout", "2"))
    cli("train", "--cache", data["cache"], "--manifest", data["manifest"], "--split", data["split"],
        "--out", root / "run", "--student", "dho-tiny-student", "--pretrained", "none", "--epochs", "2",
        "--batch-size", "8", "--workers", "0")
    return {"root": root, "checkpoint": root / "run" / "student.pt", "manifest": data["manifest"], "split": data["split"]}


class TinyCardStudent(nn.Module):
    """The model card's StudentModel with the tiny student's tower for its CLIP one."""

    def __init__(self, num_classes=5):
        super().__init__()
        from dho_pipeline.clip_models import load_clip

        self.backbone = load_clip("dho-tiny-student", "none").model.float().visual
        self.ce_head = nn.Linear(48, num_classes)
        self.kd_head = nn.Linear(48, num_classes)

    def forward(self, x):
        features = self.backbone(x)
        return self.ce_head(features), self.kd_head(F.normalize(features, dim=1)) * 100


def holdout_pixels(run) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's held-out images as the student's normalised 32 x 32 centre views; and their labels."""
    from dho_pipeline.manifest import load_manifest
    from dho_pipeline.split import load_split

    manifest, split = load_manifest(run["manifest"]), load_split(run["split"])
    pixels, labels = [], []
    for shard in manifest.shards:
        samples = list(wds.WebDataset(str(shard.path), shardshuffle=False))
        for position in split.holdout.get(shard.name, []):
            pixels.append(student_view(Image.open(io.BytesIO(samples[position]["jpg"])).convert("RGB"), 32))
            labels.append(shard.labels[position])
    return openai_normalized(np.stack(pixels)), torch.tensor(labels)


def fit_head(head: nn.Linear, features: torch.Tensor, logits: torch.Tensor) -> None:
    """Set a head's weight and bias so that head(features) == logits (10 images, 48 features: exact)."""
    with_bias = torch.cat([features, torch.ones(len(features), 1)], dim=1).double()
    solution = torch.linalg.lstsq(with_bias, logits.double(), driver="gelsd").solution.float()
    with torch.no_grad():
        head.weight.copy_(solution[:-1].T)
        head.bias.copy_(solution[-1])


def heads_that_disagree(run, path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The run's checkpoint with heads refitted so that the mix matters: on the first 7 held-out images the
    CE head is confidently right and the KD head wrong, on the last 3 the other way round. At the paper's
    alpha = beta = 0.5 the sharpened KD head wins (3 of 10); weighting the CE head gets 7 of 10.
    Returns (ce logits, kd logits, labels) of the held-out images, computed by the card's model."""
    checkpoint = torch.load(run["checkpoint"], weights_only=True)
    model = TinyCardStudent()
    model.load_state_dict(checkpoint["model_state_dict"])  # strict
    model.eval()
    x, labels = holdout_pixels(run)
    with torch.no_grad():
        features = model.backbone(x)
    right, wrong = F.one_hot(labels, 5).float(), F.one_hot((labels + 1) % 5, 5).float()
    first = (torch.arange(len(labels)) < 7).float()[:, None]
    # Scales chosen so that no (alpha, beta) on the grid comes within 0.01 of a tie between two classes.
    fit_head(model.ce_head, features, 5 * (first * right + (1 - first) * wrong))
    fit_head(model.kd_head, F.normalize(features, dim=1), 0.033 * (first * wrong + (1 - first) * right))
    checkpoint["model_state_dict"] = model.state_dict()
    torch.save(checkpoint, path)
    with torch.no_grad():
        ce, kd = model(x)
    return ce, kd, labels


def mix_accuracy(ce, kd, labels, alpha, beta) -> float:
    """Top-1 of alpha * softmax(ce) + (1 - alpha) * softmax(kd / beta), written out."""
    mix = alpha * ce.softmax(1) + (1 - alpha) * (kd / beta).softmax(1)
    return (mix.argmax(1) == labels).float().mean().item()


def test_calibrate_on_held_out_images(run, tmp_path):
    disagreeing = tmp_path / "disagreeing.pt"
    ce, kd, labels = heads_that_disagree(run, disagreeing)
    out = tmp_path / "calibrated.pt"
    result = cli("calibrate", "--checkpoint", disagreeing, "--data", run["manifest"], "--split", run["split"],
                 "--out", out, "--workers", "0")
    assert "on 10 held-out images" in result.output
    checkpoint = torch.load(out, weights_only=True)
    report = json.loads((tmp_path / "calibrated.pt.calibration.json").read_text())
    assert checkpoint["alpha"] == report["alpha"] and checkpoint["beta"] == report["beta"]
    assert checkpoint["acc"] == pytest.approx(report["accuracy"]["mix"])
    assert checkpoint["dho_pipeline"]["calibrated_on"]["samples"] == 10
    assert checkpoint["dho_pipeline"]["calibrated_on"]["split_fingerprint"].startswith("sha256:")
    assert {"ce", "kd", "mix"} == set(report["nll"]) == set(report["ece"])
    assert (tmp_path / "calibrated.pt.calibration.png").stat().st_size > 1000
    # The grid and the chosen point checked against the card's model and the mix written out here.
    alphas, betas = report["coarse_grid"]["alphas"], report["coarse_grid"]["betas"]
    assert alphas == pytest.approx([0.05 * i for i in range(21)]) and betas == [0.5, 0.75, 1, 1.25, 1.5, 2, 4]
    expected = np.array([[mix_accuracy(ce, kd, labels, a, b) for b in betas] for a in alphas])
    assert np.array(report["coarse_grid"]["accuracy"]) == pytest.approx(expected)
    assert expected.max() == pytest.approx(0.7) and mix_accuracy(ce, kd, labels, 0.5, 0.5) == pytest.approx(0.3)
    assert report["paper_setting"]["accuracy"] == pytest.approx(0.3)
    assert report["accuracy"]["mix"] == pytest.approx(mix_accuracy(ce, kd, labels, report["alpha"], report["beta"]))
    assert report["accuracy"]["mix"] == pytest.approx(0.7) and report["alpha"] > 0.5
    assert report["accuracy"]["ce"] == pytest.approx(0.7) and report["accuracy"]["kd"] == pytest.approx(0.3)
    # The calibrated checkpoint is what evaluate then uses.
    evaluated = json.loads(cli("evaluate", "--checkpoint", out, "--data", run["manifest"], "--json", "--workers", "0").stdout)
    assert evaluated["alpha"] == report["alpha"] and evaluated["beta"] == report["beta"]


def test_calibrate_refuses_training_images(run, tmp_path):
    out = tmp_path / "x.pt"
    result = cli("calibrate", "--checkpoint", run["checkpoint"], "--data", run["manifest"], "--out", out, expect_exit=1)
    assert "were in the checkpoint's training labeled set" in result.output and not out.exists()
    cli("calibrate", "--checkpoint", run["checkpoint"], "--data", run["manifest"], "--out", out, "--allow-overlap",
        "--workers", "0")
    assert torch.load(out, weights_only=True)["dho_pipeline"]["calibrated_on"]["overlap_with_training_labels"] > 0


def test_ties_go_to_the_papers_setting():
    counts = torch.zeros(21, 7)
    counts[:, :] = 5
    alphas = [round(0.05 * i, 2) for i in range(21)]
    assert best_point(counts, alphas, [0.5, 0.75, 1, 1.25, 1.5, 2, 4])[:2] == (0.5, 0.5)
    counts[3, 6] = 6
    assert best_point(counts, alphas, [0.5, 0.75, 1, 1.25, 1.5, 2, 4])[:2] == (0.15, 4)


@pytest.mark.slow
def test_evaluate_counts_every_sample_once_across_processes(run, tmp_path):
    single = json.loads(cli("evaluate", "--checkpoint", run["checkpoint"], "--data", run["manifest"], "--json",
                            "--workers", "0", "--batch-size", "7").stdout)
    result = run_command(BIN / "torchrun", "--nproc_per_node", "2", "--no-python", BIN / "dho-pipeline", "evaluate",
                         "--checkpoint", run["checkpoint"], "--data", run["manifest"], "--json", "--workers", "0",
                         "--batch-size", "7", env={"OMP_NUM_THREADS": "1"})
    double = json.loads(result.stdout)
    assert double["samples"] == single["samples"] == 60
    for head in ("ce", "kd", "mix"):
        assert double[head]["top1"] == pytest.approx(single[head]["top1"])
        assert double[head]["per_class_correct"] == single[head]["per_class_correct"]
        assert double[head]["nll"] == pytest.approx(single[head]["nll"], rel=1e-4)


# ---- bad input (the pickle tests: tests/faults/test_fault_security.py) -------------------------------------


def test_bad_checkpoint_and_image_inputs(run, tmp_path):
    result = cli("predict", "--checkpoint", tmp_path / "none.pt", tmp_path / "x.png", expect_exit=1)
    assert "does not exist" in result.output
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    result = cli("predict", "--checkpoint", run["checkpoint"], tmp_path / "broken.png", expect_exit=1)
    assert "broken.png cannot be decoded" in result.output
    classes, _ = write_lists(tmp_path / "c", classnames=["a", "b", "c"])
    result = cli("evaluate", "--checkpoint", run["checkpoint"], "--data", run["manifest"], "--classnames", classes,
                 expect_exit=1)
    assert "5-class heads but the class list given has 3 names" in result.output
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    result = cli("export", tmp_path / "garbage.pt", "--out", tmp_path / "g.safetensors", expect_exit=1)
    assert "garbage.pt" in result.output and not (tmp_path / "g.safetensors").exists()
    torch.save({"model_state_dict": {"ce_head.weight": torch.zeros(5, 48)}}, tmp_path / "headless.pt")
    result = cli("export", tmp_path / "headless.pt", expect_exit=1)
    assert "lacks the dual heads" in result.output
