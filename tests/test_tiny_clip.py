"""The demo's tiny CLIPs: reproducible pretraining and compact weight files."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from dho_pipeline.demo.digits import CLASSNAMES, CROP_SCALE, TEMPLATES, load_digit_images, three_way_split
from dho_pipeline.hashing import safetensors_fingerprint as content_fingerprint
from dho_pipeline.demo.tiny_clip import TOKEN_TABLE, expand_compact, pretrain, save_compact


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
    from dho_pipeline.stages.pretrain_demo import RECIPES, SHIPPED

    for stem, (name, *_rest) in RECIPES.items():
        assert (SHIPPED / f"{stem}.safetensors").stat().st_size < 3_000_000


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
