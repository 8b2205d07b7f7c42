"""Sharing students: export formats that load back (open_clip folder, ONNX, safetensors), the Python API,
predict on folders and globs, and the runs report."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cached_dataset, cli, random_image
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def train_args(data, out, *extra):
    return ["train", "--cache", data["cache"], "--manifest", data["manifest"], "--split", data["split"], "--out", out,
            "--student", "dho-tiny-student", "--pretrained", "none", "--batch-size", "8", "--workers", "0",
            "--report-to", "none", *extra]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A tiny trained and calibrated student, its data, and a few loose images."""
    root = tmp_path_factory.mktemp("sharing")
    data = cached_dataset(root, num_shards=3, per_shard=20, cache_options=("--views", "2"),
                          split_options=("--percent", "20", "--holdout", "2"))
    cli(*train_args(data, root / "run", "--epochs", "2", "--lr", "1e-3"))
    calibrated = root / "run" / "student-calibrated.pt"
    cli("calibrate", "--checkpoint", root / "run" / "student.pt", "--data", data["manifest"], "--split", data["split"],
        "--out", calibrated, "--workers", "0")
    rng = np.random.default_rng(3)
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    for i in range(4):
        random_image(rng, 40 + 7 * i, 36).save(images / f"a{i}.png")
    for i in range(3):
        random_image(rng, 50, 64).save(images / "sub" / f"b{i}.jpg")
    (images / "sub" / "notes.txt").write_text("not an image")
    return {**data, "root": root, "run": root / "run", "checkpoint": calibrated, "images": images}


def evaluate_json(checkpoint, manifest) -> dict:
    return json.loads(cli("evaluate", "--checkpoint", checkpoint, "--data", manifest, "--json", "--workers", "0").stdout)


def predict_json(checkpoint, *images) -> list[dict]:
    return json.loads(cli("predict", "--checkpoint", checkpoint, *images, "--json", "--topk", "5").stdout)


def same_evaluation(a: dict, b: dict) -> None:
    assert a["samples"] == b["samples"] and a["alpha"] == b["alpha"] and a["beta"] == b["beta"]
    for head in ("ce", "kd", "mix"):
        assert a[head]["top1"] == b[head]["top1"] and a[head]["per_class_correct"] == b[head]["per_class_correct"]
        assert a[head]["nll"] == pytest.approx(b[head]["nll"], rel=1e-5)


def ordinary_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask  # 0644 under the usual umask 022


# ---- open_clip folder ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("head, formula", [("cosine", "softmax(100 * kd_head(f / |f|) / beta)"),
                                           ("linear", "softmax(kd_head(f) / beta)")])
def test_the_model_card_gives_the_formula_and_view_of_the_students_own_heads(shared, head, formula):
    import dataclasses

    from dho_pipeline.model_card import model_card
    from dho_pipeline.student_checkpoint import read_student

    checkpoint = read_student(shared["checkpoint"])
    metadata = dataclasses.replace(checkpoint.metadata, head=head,
                                   preprocess=dataclasses.replace(checkpoint.metadata.preprocess, crop_fraction=0.875))
    card = model_card(name="x", checkpoint_path=shared["checkpoint"], checkpoint=dataclasses.replace(
        checkpoint, metadata=metadata), architecture=metadata.model, text_tower={"model": "m", "weights": "none"},
        evaluation=None)
    assert f"(1 - alpha) * {formula}" in card and card.count("kd_head(") == 1
    size = metadata.preprocess.image_size
    assert f"take the centred square of 0.875 of the shorter side and resize it to {size[0]}x{size[1]}" in card


def test_open_clip_folder_loads_in_open_clip_and_everywhere_a_student_is_taken(shared, tmp_path):
    import open_clip

    from dho_pipeline.clip_models import load_clip
    from dho_pipeline.student_checkpoint import load_student

    report = tmp_path / "val.json"
    report.write_text(cli("evaluate", "--checkpoint", shared["checkpoint"], "--data", shared["manifest"], "--json",
                          "--workers", "0").stdout)
    folder = tmp_path / "tiny-dho"
    result = cli("export", shared["checkpoint"], "--format", "open_clip", "--out", folder, "--metrics", report)
    assert "hf upload REPO" in result.output
    names = {p.name for p in folder.iterdir()}
    assert names == {"open_clip_config.json", "open_clip_model.safetensors", "dho_heads.safetensors", "dho_student.json",
                     "classnames.txt", "README.md"}
    assert all(stat.S_IMODE(p.stat().st_mode) == ordinary_mode() for p in folder.iterdir())

    # open_clip's own loader takes the folder; its image tower is the student's, its text tower the start's.
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    student = load_student(shared["checkpoint"])
    start = load_clip("dho-tiny-student", "none").model
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval().encode_image(x), student.model.backbone(x))
        tokens = open_clip.get_tokenizer(f"local-dir:{folder}")(["a photo of a cat."])
        assert torch.equal(model.encode_text(tokens), start.encode_text(tokens))
    assert preprocess.transforms[0].size == 32  # resize shortest side, as the student was evaluated

    # Everything that takes a student takes the folder, with the same results as the checkpoint.
    same_evaluation(evaluate_json(folder, shared["manifest"]), evaluate_json(shared["checkpoint"], shared["manifest"]))
    images = sorted(shared["images"].glob("*.png"))
    for ours, theirs in zip(predict_json(folder, *images), predict_json(shared["checkpoint"], *images)):
        assert [p["class"] for p in ours["predictions"]] == [p["class"] for p in theirs["predictions"]]
        assert np.allclose([p["probability"] for p in ours["predictions"]],
                           [p["probability"] for p in theirs["predictions"]], atol=1e-6)
    cli("calibrate", "--checkpoint", folder, "--data", shared["manifest"], "--split", shared["split"],
        "--out", tmp_path / "again.pt", "--workers", "0")
    original = torch.load(shared["checkpoint"], weights_only=True)
    again = torch.load(tmp_path / "again.pt", weights_only=True)
    assert (again["alpha"], again["beta"]) == (original["alpha"], original["beta"])

    # The model card: teacher, data, split and label budget, metrics of each head and the mix, calibration.
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: open_clip")
    assert "`dho-test-vit` / `none`" in card  # the teacher, read from the cache's spec
    assert "label budget: 20% labels, seed 13: 10 labeled, 10 held out" in card
    evaluation = json.loads(report.read_text())
    assert f"| mix (alpha, beta) | {100 * evaluation['mix']['top1']:.2f}% |" in card
    assert f"| KD head | {100 * evaluation['kd']['top1']:.2f}% |" in card
    assert f"alpha = {original['alpha']:g}, beta = {original['beta']:g}, chosen by `dho-pipeline calibrate` on 10" in card
    assert "On those held-out images:" in card
    assert (folder / "classnames.txt").read_text().split() == ["cat", "dog", "bird", "fish", "frog"]


def test_open_clip_export_of_a_tower_open_clip_cannot_hold_is_refused(shared, tmp_path):
    """A checkpoint whose backbone does not fit the architecture it names is refused with one line."""
    payload = torch.load(shared["checkpoint"], weights_only=True)
    payload["dho_pipeline"]["student"]["model"] = "dho-test-vit"  # 32-wide towers, not the student's 48
    torch.save(payload, tmp_path / "wrong.pt")
    result = cli("export", tmp_path / "wrong.pt", "--format", "open_clip", "--out", tmp_path / "x", expect_exit=1)
    assert "does not fit dho-test-vit" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


# ---- ONNX ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_onnx_export_matches_pytorch(shared, tmp_path):
    import onnxruntime as ort  # in the test extra (pip install 'dho-pipeline[onnx]'): a failure, never a skip
    import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    from dho_pipeline import load_student

    out = tmp_path / "student.onnx"
    cli("export", shared["checkpoint"], "--format", "onnx", "--out", out)
    assert stat.S_IMODE(out.stat().st_mode) == ordinary_mode()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert isinstance(session.get_inputs()[0].shape[0], str)  # a symbolic (dynamic) batch axis
    assert [o.name for o in session.get_outputs()] == ["probs", "ce_logits", "kd_logits"]
    meta = json.loads(session.get_modelmeta().custom_metadata_map["dho_pipeline"])
    student = load_student(shared["checkpoint"])
    assert meta["classnames"] == student.classnames and (meta["alpha"], meta["beta"]) == (student.alpha, student.beta)
    for batch in (1, 3, 5):
        x = torch.randn(batch, 3, 32, 32)
        probs, ce, kd = session.run(None, {"image": x.numpy()})
        with torch.no_grad():
            expected = student.outputs(x)
        assert np.abs(probs - expected[0].numpy()).max() < 1e-4
        assert np.abs(ce - expected[1].numpy()).max() < 1e-4
        assert np.abs(kd - expected[2].numpy()).max() < 1e-3  # logits x 100
        assert probs.shape == (batch, 5) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_onnx_export_without_the_exporter_packages_is_one_line(shared, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as where it is not installed
    result = cli("export", shared["checkpoint"], "--format", "onnx", "--out", tmp_path / "s.onnx", expect_exit=1)
    assert "pip install 'dho-pipeline[onnx]'" in result.output and len(result.output.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


# ---- safetensors + JSON, and what each command takes ------------------------------------------------------


def test_safetensors_export_is_readable_and_runs_everywhere(shared, tmp_path):
    out = tmp_path / "student.safetensors"
    cli("export", shared["checkpoint"], "--format", "safetensors", "--out", out)
    assert stat.S_IMODE(out.stat().st_mode) == ordinary_mode() == stat.S_IMODE(out.with_suffix(".json").stat().st_mode)
    expected = evaluate_json(shared["checkpoint"], shared["manifest"])
    same_evaluation(evaluate_json(out, shared["manifest"]), expected)
    same_evaluation(evaluate_json(out.with_suffix(".json"), shared["manifest"]), expected)
    cli("calibrate", "--checkpoint", out, "--data", shared["manifest"], "--split", shared["split"],
        "--out", tmp_path / "again.pt", "--workers", "0")
    # the metadata travelled: calibrate still refuses the student's own labeled images
    result = cli("calibrate", "--checkpoint", out, "--data", shared["manifest"], "--out", tmp_path / "x.pt", expect_exit=1)
    assert "were in the checkpoint's training labeled set" in result.output


@pytest.mark.parametrize("command", ["predict", "evaluate", "calibrate"])
def test_commands_name_the_formats_they_take(shared, tmp_path, command):
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07\x12\x07pytorch")  # what an ONNX file begins with
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "folder").mkdir()
    image = next(shared["images"].glob("*.png"))
    for student in (tmp_path / "model.onnx", tmp_path / "notes.txt", tmp_path / "folder"):
        args = {"predict": ["predict", "--checkpoint", student, image],
                "evaluate": ["evaluate", "--checkpoint", student, "--data", shared["manifest"]],
                "calibrate": ["calibrate", "--checkpoint", student, "--data", shared["manifest"], "--out", tmp_path / "o.pt"],
                }[command]
        result = cli(*args, expect_exit=1)
        assert "this command takes a student checkpoint" in result.output, result.output
        assert "open_clip export folder" in result.output and ".safetensors export" in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert "ONNX model (run it with onnxruntime)" in cli("predict", "--checkpoint", tmp_path / "model.onnx", image,
                                                         expect_exit=1).output


# ---- the Python API --------------------------------------------------------------------------------------------


def test_python_api_predicts_as_the_command_line(shared):
    import dho_pipeline

    student = dho_pipeline.load_student(shared["checkpoint"])
    assert isinstance(student, torch.nn.Module) and student.classnames == ["cat", "dog", "bird", "fish", "frog"]
    checkpoint = torch.load(shared["checkpoint"], weights_only=True)
    assert (student.alpha, student.beta) == (checkpoint["alpha"], checkpoint["beta"])
    paths = sorted(shared["images"].glob("*.png"))
    images = [Image.open(p) for p in paths]
    from_pil = student.predict(images)
    from_tensor = student.predict(torch.stack([student.preprocess(i) for i in images]))
    assert from_pil.shape == (4, 5) and torch.allclose(from_pil.sum(1), torch.ones(4))
    assert torch.equal(from_pil, from_tensor)
    for row, cli_row in zip(from_pil, predict_json(shared["checkpoint"], *paths)):
        top = row.topk(5)
        assert [p["class"] for p in cli_row["predictions"]] == top.indices.tolist()
        assert np.allclose([p["probability"] for p in cli_row["predictions"]], top.values.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="preprocessed batch"):
        student.predict(torch.zeros(3, 32, 32))


def test_importing_the_package_stays_light():
    code = ("import sys, dho_pipeline\nassert 'torch' not in sys.modules, 'import dho_pipeline imported torch'\n"
            "assert callable(dho_pipeline.load_student) and 'torch' in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_readme_python_example_runs(shared, tmp_path):
    """The README's Python API block, run as it stands, in a folder laid out as it assumes."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "runs" / "b16").mkdir(parents=True)
    shutil.copy(shared["checkpoint"], tmp_path / "runs" / "b16" / "student-calibrated.pt")
    shutil.copy(next(shared["images"].glob("*.png")), tmp_path / "photo.jpg")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "['cat', 'dog', 'bird']" in result.stdout


# ---- predict on folders and globs ------------------------------------------------------------------------------


def test_predict_folders_globs_and_output_files(shared, tmp_path):
    images = shared["images"]
    expected = {r["image"]: r for r in predict_json(shared["checkpoint"], *sorted(images.rglob("*.png")),
                                                    *sorted(images.rglob("*.jpg")))}
    result = cli("predict", "--checkpoint", shared["checkpoint"], images / "sub", str(images / "a*.png"),
                 "--output", tmp_path / "r.jsonl", "--batch-size", "3")
    assert "wrote" in result.output and "7 images" in result.output
    assert "img/s" not in result.output  # no progress bar off a terminal
    lines = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [Path(line["image"]).name for line in lines] == ["b0.jpg", "b1.jpg", "b2.jpg", "a0.png", "a1.png", "a2.png", "a3.png"]
    for line in lines:
        theirs = expected[line["image"]]["predictions"]
        assert [p["class"] for p in line["predictions"]] == [p["class"] for p in theirs]
        assert np.allclose([p["probability"] for p in line["predictions"]], [p["probability"] for p in theirs], atol=1e-6)

    cli("predict", "--checkpoint", shared["checkpoint"], images, "--output", tmp_path / "r.csv", "--topk", "2")
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert len(rows) == 7 and list(rows[0]) == ["image", "class_1", "name_1", "probability_1", "class_2", "name_2",
                                                 "probability_2", "error"]
    for row in rows:
        best = expected[row["image"]]["predictions"][0]
        assert int(row["class_1"]) == best["class"] and row["name_1"] == best["name"]
        assert float(row["probability_1"]) == pytest.approx(best["probability"], rel=1e-5)

    # A broken image stops the run and leaves no output, or with --on-error skip is recorded.
    bad = tmp_path / "bad"
    shutil.copytree(images, bad)
    (bad / "broken.jpg").write_bytes(b"not a jpeg")
    result = cli("predict", "--checkpoint", shared["checkpoint"], bad, "--output", tmp_path / "b.csv", expect_exit=1)
    assert "broken.jpg cannot be decoded" in result.output and "--on-error skip" in result.output
    assert not list(tmp_path.glob("*b.csv*"))
    cli("predict", "--checkpoint", shared["checkpoint"], bad, "--output", tmp_path / "b.csv", "--on-error", "skip")
    rows = {Path(r["image"]).name: r for r in csv.DictReader((tmp_path / "b.csv").open())}
    assert len(rows) == 8 and "cannot be decoded" in rows["broken.jpg"]["error"] and rows["a0.png"]["error"] == ""

    assert "matches no image files" in cli("predict", "--checkpoint", shared["checkpoint"], str(tmp_path / "*.gif"),
                                           expect_exit=1).output
    assert "write a .jsonl or a .csv" in cli("predict", "--checkpoint", shared["checkpoint"], images,
                                             "--output", tmp_path / "r.txt", expect_exit=1).output


# ---- report ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_report_compares_runs_on_one_cache(shared, tmp_path):
    data = shared
    runs = {name: tmp_path / name for name in ("dho-s0", "dho-s1", "ce-s0")}
    cli(*train_args(data, runs["dho-s0"], "--max-steps", "3"))
    cli(*train_args(data, runs["dho-s1"], "--max-steps", "3", "--seed", "1"))
    cli(*train_args(data, runs["ce-s0"], "--max-steps", "3", "--objective", "ce", "--lr", "1e-3"))
    prefix = tmp_path / "cmp" / "report"
    result = cli("report", *runs.values(), "--data", data["manifest"], "--out", prefix, "--workers", "0")
    assert "# Over seeds (mean ± sd)" in result.output
    for suffix in (".md", ".csv", ".json", ".png"):
        assert prefix.with_name("report" + suffix).stat().st_size > 100
    document = json.loads(prefix.with_name("report.json").read_text())
    rows = {row["run"]: row for row in document["runs"]}
    assert document["differing_settings"] == ["lr"]  # objective and seed have columns of their own
    for name, run in runs.items():  # each row is the run's own evaluation
        evaluation = evaluate_json(run / "student.pt", data["manifest"])
        for head in ("ce", "kd", "mix"):
            assert rows[name][f"{head}_top1"] == pytest.approx(evaluation[head]["top1"])
            assert rows[name][f"{head}_nll"] == pytest.approx(evaluation[head]["nll"], rel=1e-5)
            assert rows[name][f"{head}_ece"] == pytest.approx(evaluation[head]["ece"], rel=1e-5)
        assert rows[name]["steps"] == 3 and rows[name]["wall_seconds"] > 0
        assert rows[name]["label_budget"] == "20% (10 labeled)"
    (group,) = document["over_seeds"]
    assert group["runs"] == 2 and group["seeds"] == [0, 1] and group["objective"] == "dho"
    values = [rows["dho-s0"]["mix_nll"], rows["dho-s1"]["mix_nll"]]
    assert group["mix_nll"]["mean"] == pytest.approx(np.mean(values))
    assert group["mix_nll"]["sd"] == pytest.approx(np.std(values, ddof=1))
    table = list(csv.DictReader(prefix.with_name("report.csv").open()))
    assert [r["run"] for r in table] == ["dho-s0", "dho-s1", "ce-s0"] and "lr" in table[0]

    # Evaluations are kept and reused; without --data the kept ones are the metrics.
    kept = sorted((runs["dho-s0"] / "evaluations").glob("*.json"))
    assert len(kept) == 1
    stamp = kept[0].stat().st_mtime_ns
    cli("report", *runs.values(), "--out", tmp_path / "again", "--workers", "0")
    again = json.loads((tmp_path / "again.json").read_text())
    assert kept[0].stat().st_mtime_ns == stamp
    assert [r["mix_top1"] for r in again["runs"]] == [r["mix_top1"] for r in document["runs"]]

    # A run against another cache is refused unless --allow-mixed.
    other = cached_dataset(tmp_path / "other", num_shards=3, per_shard=20, cache_options=("--views", "1"),
                           split_options=("--percent", "20", "--holdout", "2"))
    cli(*train_args(other, tmp_path / "other-run", "--max-steps", "2"))
    result = cli("report", runs["dho-s0"], tmp_path / "other-run", "--out", tmp_path / "x", expect_exit=1)
    assert "trained against different teacher caches" in result.output and "--allow-mixed" in result.output
    assert not (tmp_path / "x.md").exists()
    cli("report", runs["dho-s0"], tmp_path / "other-run", "--out", tmp_path / "z", "--allow-mixed", "--workers", "0")
    assert "warning: runs trained against different teacher caches" in (tmp_path / "z.md").read_text()
    # ... and so are runs evaluated on different data: dho-s0's newest evaluation is now on other data.
    cli("report", runs["dho-s0"], "--data", other["manifest"], "--out", tmp_path / "y", "--workers", "0")
    result = cli("report", runs["dho-s0"], runs["ce-s0"], "--out", tmp_path / "w", expect_exit=1)
    assert "evaluated on different data" in result.output
