"""The demo's tiny CLIPs: reproducible pretraining and compact weight files."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from dho_pipeline.digits import CLASSNAMES, CROP_SCALE, TEMPLATES, load_digit_images, three_way_split
from dho_pipeline.tiny_clip import TOKEN_TABLE, content_fingerprint, expand_compact, pretrain, save_compact


def test_pretraining_is_reproducible_and_compact_files_expand(tmp_path):
    images, labels = load_digit_images(32)
    chosen = three_way_split(len(images))["pretrain"][:128]
    fingerprints = []
    for run in range(2):
        model, used = pretrain("dho-test-vit", [images[i] for i in chosen], labels[chosen], CLASSNAMES, TEMPLATES,
                               epochs=2, seed=3, crop_scale=CROP_SCALE)
        save_compact(model, used, tmp_path / f"{run}.safetensors", name="dho-test-vit", seed=3, about={"run": "x"})
        fingerprints.append(content_fingerprint(tmp_path / f"{run}.safetensors"))
    assert fingerprints[0] == fingerprints[1]  # bit for bit

    expand_compact(tmp_path / "0.safetensors", tmp_path / "full.safetensors")
    full, trained = load_file(str(tmp_path / "full.safetensors")), model.state_dict()
    assert set(full) == set(trained)
    assert all(torch.equal(full[k], trained[k]) for k in trained)  # the unused token rows came back from the seed
    assert (tmp_path / "0.safetensors").stat().st_size < (tmp_path / "full.safetensors").stat().st_size / 5
    assert len(used) < 40 and trained[TOKEN_TABLE].shape[0] == 49408


def test_shipped_demo_weights_load():
    from stages.pretrain_demo import RECIPES, SHIPPED

    for stem, (name, *_rest) in RECIPES.items():
        assert (SHIPPED / f"{stem}.safetensors").stat().st_size < 3_000_000
