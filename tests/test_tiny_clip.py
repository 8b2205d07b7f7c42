"""The demo's tiny CLIPs: reproducible pretraining, compact weight files, and the shipped weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dho_pipeline
from dho_pipeline.demo.digits import CLASSNAMES, CROP_SCALE, TEMPLATES, load_digit_images, three_way_split
from dho_pipeline.demo.tiny_clip import TOKEN_TABLE, expand_compact, pretrain, save_compact
from dho_pipeline.hashing import safetensors_fingerprint as content_fingerprint
from dho_pipeline.stages import pretrain_demo
from dho_pipeline.stages.pretrain_demo import RECIPES, SHIPPED

MODEL_CONFIGS = Path(dho_pipeline.__file__).parent / "model_configs"


def test_pretraining_is_reproducible_and_compact_files_expand(tmp_path):
    images, labels = load_digit_images(32)
    chosen = three_way_split(len(images))["pretrain"][:128]
    states, fingerprints = [], []
    for run, seed in enumerate((3, 3, 4)):
        model, used = pretrain("dho-test-vit", [images[i] for i in chosen], labels[chosen], CLASSNAMES, TEMPLATES,
                               epochs=2, seed=seed, crop_scale=CROP_SCALE)
        save_compact(model, used, tmp_path / f"{run}.safetensors", name="dho-test-vit", seed=seed, about={"run": "x"})
        states.append(model.state_dict())
        fingerprints.append(content_fingerprint(tmp_path / f"{run}.safetensors"))
    # The same seed: every tensor bit for bit (compared directly, not only through the fingerprint).
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert fingerprints[0] == fingerprints[1]
    # Another seed: other weights, another fingerprint.
    assert not torch.equal(states[0]["visual.proj"], states[2]["visual.proj"]) and fingerprints[2] != fingerprints[0]

    expand_compact(tmp_path / "0.safetensors", tmp_path / "full.safetensors")
    full, trained = load_file(str(tmp_path / "full.safetensors")), states[0]
    assert set(full) == set(trained)
    assert all(torch.equal(full[k], trained[k]) for k in trained)  # the unused token rows came back from the seed
    assert (tmp_path / "0.safetensors").stat().st_size < (tmp_path / "full.safetensors").stat().st_size / 5
    assert len(used) < 40 and trained[TOKEN_TABLE].shape[0] == 49408


def digit_zero_shot_accuracy(model, tokenizer, part: str = "train") -> float:
    """Zero-shot top-1 on a part of the digits, from open_clip calls alone: the 32 x 32 digits are their
    own centre view; classes are the renormalised mean of per-template normalised text embeddings."""
    images, labels = load_digit_images(32)
    chosen = three_way_split(len(images))[part]
    pixels = torch.from_numpy(np.stack([np.asarray(images[i]) for i in chosen])).permute(0, 3, 1, 2).float() / 255
    mean, std = model.visual.preprocess_cfg["mean"], model.visual.preprocess_cfg["std"]
    x = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    texts = tokenizer([template.replace("{}", name) for name in CLASSNAMES for template in TEMPLATES])
    with torch.no_grad():
        text = F.normalize(model.encode_text(texts).view(len(CLASSNAMES), len(TEMPLATES), -1), dim=-1)
        classes = F.normalize(text.mean(dim=1), dim=-1)
        predicted = (F.normalize(model.encode_image(x), dim=-1) @ classes.T).argmax(dim=1)
    return float((predicted.numpy() == labels[chosen]).mean())


def test_shipped_demo_weights_load_and_classify_digits(tmp_path):
    """Each shipped compact file expands into an open_clip weights file that open_clip itself loads (the
    demo passes it as --pretrained), holding exactly the compact file's tensors; the loaded model
    classifies the digits' train part zero-shot at the accuracy recorded when it was pretrained."""
    import open_clip

    from dho_pipeline.clip_models import load_clip

    accuracy = {}
    for stem, (name, *_recipe) in RECIPES.items():
        open_clip.add_model_config(MODEL_CONFIGS / f"{name}.json")
        expanded = tmp_path / f"{stem}.safetensors"
        about = expand_compact(SHIPPED / f"{stem}.safetensors", expanded)
        model = open_clip.create_model(name, pretrained=str(expanded)).eval()
        state, compact = model.state_dict(), load_file(str(SHIPPED / f"{stem}.safetensors"))
        ids, rows = compact.pop("token_rows.ids"), compact.pop("token_rows.values")
        assert set(state) == set(compact) | {TOKEN_TABLE}
        assert all(torch.equal(state[k], compact[k]) for k in compact)
        assert torch.equal(state[TOKEN_TABLE][ids], rows)
        # The pipeline's own loader takes the same file to the same weights.
        pipeline_state = load_clip(name, str(expanded)).model.state_dict()
        assert all(torch.equal(pipeline_state[k], state[k]) for k in state)

        accuracy[stem] = digit_zero_shot_accuracy(model, open_clip.get_tokenizer(name))
        assert accuracy[stem] == pytest.approx(about["zero_shot_on_train_part"], abs=1.5 / 800), stem
    # Trained, not random (chance is 10%): the teacher reads digits, the student starts weak.
    assert accuracy["tiny-teacher"] > 0.9 and accuracy["tiny-teacher"] > accuracy["tiny-student"] + 0.5


def test_shipped_files_record_the_recipe_the_code_runs():
    """What `pretrain-demo-clips` would run (RECIPES, the digits' crop scale, the captions' tokens) is what
    the shipped files say they were made with; a file made otherwise could not match on --check."""
    import open_clip

    for stem, (name, count, epochs, seed) in RECIPES.items():
        with safe_open(str(SHIPPED / f"{stem}.safetensors"), framework="pt") as handle:
            metadata, ids = handle.metadata(), handle.get_tensor("token_rows.ids")
        assert metadata["model"] == name and int(metadata["seed"]) == seed
        about = json.loads(metadata["about"])
        assert {k: about[k] for k in ("pretrain_images", "epochs", "seed", "crop_scale")} == {
            "pretrain_images": count, "epochs": epochs, "seed": seed, "crop_scale": list(CROP_SCALE)}
        open_clip.add_model_config(MODEL_CONFIGS / f"{name}.json")
        tokens = open_clip.get_tokenizer(name)([t.replace("{}", c) for c in CLASSNAMES for t in TEMPLATES])
        assert ids.tolist() == sorted(set(tokens.flatten().tolist()))
        assert (SHIPPED / f"{stem}.safetensors").stat().st_size < 3_000_000  # compact: no full token table


@pytest.mark.slow
def test_check_retrains_the_shipped_student_bit_for_bit(tmp_path, monkeypatch):
    """`pretrain-demo-clips --check`'s own code path for the shipped student (its full recipe, ~20 s on one
    thread; the teacher's takes ~3 min, too long for the suite): retrained, it matches the shipped file bit
    for bit; the comparison it makes (content fingerprints) sees a one-ulp change in one weight."""
    student = {"tiny-student": RECIPES["tiny-student"]}
    monkeypatch.setattr(pretrain_demo, "RECIPES", student)
    result = pretrain_demo.run(pretrain_demo.Config(check=True))  # compares with SHIPPED
    assert result["tiny-student"]["matches_shipped"] is True
    assert result["tiny-student"]["fingerprint"] == content_fingerprint(SHIPPED / "tiny-student.safetensors")

    with safe_open(str(SHIPPED / "tiny-student.safetensors"), framework="pt") as handle:
        tensors, metadata = {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()
    tensors["visual.proj"][0, 0] = torch.nextafter(tensors["visual.proj"][0, 0], torch.tensor(1.0))
    save_file(tensors, str(tmp_path / "changed.safetensors"), metadata=metadata)
    assert content_fingerprint(tmp_path / "changed.safetensors") != result["tiny-student"]["fingerprint"]


def test_weights_fingerprint_ignores_the_header_order(tmp_path):
    """safetensors writes its header in hash order; the fingerprint must not care (cache specs use it)."""
    from safetensors.torch import save_file

    from dho_pipeline.hashing import weights_fingerprint

    tensors = {"a": torch.arange(6.0), "b": torch.ones(2, 3)}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"k1": "1", "k2": "2"})
    save_file(dict(reversed(list(tensors.items()))), str(tmp_path / "y.safetensors"), metadata={"k2": "2", "k1": "1"})
    assert weights_fingerprint(tmp_path / "x.safetensors") == weights_fingerprint(tmp_path / "y.safetensors")
    save_file({**tensors, "a": torch.arange(6.0) + 1}, str(tmp_path / "z.safetensors"), metadata={"k1": "1", "k2": "2"})
    assert weights_fingerprint(tmp_path / "z.safetensors") != weights_fingerprint(tmp_path / "x.safetensors")
