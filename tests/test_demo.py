"""The demo pipeline end to end at a smaller size: the report's structure and real numbers."""

from __future__ import annotations

import json
import math

import pytest
from helpers import cli
from test_tiny_clip import MODEL_CONFIGS, digit_zero_shot_accuracy  # zero-shot from open_clip calls alone


@pytest.mark.slow
def test_demo_reports_real_measurements(tmp_path):
    out = tmp_path / "demo"
    results = json.loads(cli("demo", "--out", out, "--epochs", "2", "--views", "2", "--json").stdout)
    accuracy = results["accuracy"]
    assert set(accuracy) == {
        "teacher zero-shot", "student zero-shot (before training)", "CE-only", "single-head CE+KD", "DHO, CE head",
        "DHO, KD head", "DHO, combined (calibrated)", "DHO combined, 1 cached view", "DHO combined, teacher online",
    }
    assert all(math.isfinite(v) and 0 <= v <= 1 for v in accuracy.values())
    assert len(set(accuracy.values())) >= 5  # measured, not copied: methods differ
    assert accuracy["teacher zero-shot"] > accuracy["student zero-shot (before training)"] + 0.3
    assert results["test_images"] == 397
    # The zero-shot figures are measured: open_clip alone, on the weights the demo expanded, agrees.
    import open_clip

    for who, name in (("teacher", "dho-tiny-teacher"), ("student", "dho-tiny-student")):
        open_clip.add_model_config(MODEL_CONFIGS / f"{name}.json")
        model = open_clip.create_model(name, pretrained=str(out / "weights" / f"tiny-{who}.safetensors")).eval()
        measured = digit_zero_shot_accuracy(model, open_clip.get_tokenizer(name), "test")
        reported = accuracy["teacher zero-shot" if who == "teacher" else "student zero-shot (before training)"]
        assert reported == pytest.approx(measured, abs=1.5 / 397), who
    report = out / "report-1pct-seed0"  # the demo runs 1% labels by default
    for name in ("results.json", "report.md", "accuracy.png", "dho-training-loss.png", "dho-calibration.png"):
        assert (report / name).stat().st_size > 0, name
    text = (report / "report.md").read_text()
    assert "| DHO, combined (calibrated) |" in text and "dho-pipeline cache-teacher" in text
    commands = [c["command"] for c in results["commands"]]
    for stage in ("manifest", "cache-teacher", "split", "train", "calibrate", "evaluate"):
        assert any(c.startswith(f"dho-pipeline {stage} ") for c in commands), stage
    assert any("--teacher-online" in c for c in commands)
    # A rerun resumes everything (shards byte-identical, caches complete, runs finished) and agrees.
    again = json.loads(cli("demo", "--out", out, "--epochs", "2", "--views", "2", "--json").stdout)
    assert again["accuracy"] == accuracy
    # ... and reports each reused step (caches, training runs) with the time it took when it did the work,
    # marked as reused, never the moment the skip took; the report says so.
    first = {c["command"]: c for c in results["commands"]}
    reused = [c for c in again["commands"] if c["reused"]]
    assert {c["command"].split()[1] for c in reused} == {"cache-teacher", "train"} and len(reused) == 9
    assert all(c["seconds"] == first[c["command"]]["seconds"] and not first[c["command"]]["reused"] for c in reused)
    assert not any(c["reused"] for c in again["commands"] if c["command"].split()[1] in ("calibrate", "evaluate"))
    text = (report / "report.md").read_text()
    assert "9 step(s) reused the work of an earlier run" in text and " (reused) | `dho-pipeline train " in text
    # calibration on enough held-out images to rank the grid, and the report says how many chose the point
    assert again["dho_alpha_beta"]["held_out_images"] == 100
    assert f"chosen on the {again['dho_alpha_beta']['held_out_images']} held-out train images" in text
