"""The few-shot recipes that ship: complete train configs once SHOTS and EPOCHS are set, the reference's
settings, the data set's shipped templates; recipe variables (`${SHOTS}`, `${SEED:-1}`)."""

from __future__ import annotations

import re

import pytest
from helpers import cli

from dho_pipeline.errors import UserError
from dho_pipeline.package_data import RECIPES, TEMPLATES, shipped_file
from dho_pipeline.stages.train import Config, load_recipe

FEW_SHOT = sorted(RECIPES.glob("fewshot-*.toml"))


def test_one_recipe_per_data_set():
    assert [r.stem for r in FEW_SHOT] == [
        "fewshot-caltech101", "fewshot-dtd", "fewshot-eurosat", "fewshot-fgvc-aircraft", "fewshot-food101",
        "fewshot-imagenet", "fewshot-oxford-flowers", "fewshot-oxford-pets", "fewshot-stanford-cars",
        "fewshot-sun397", "fewshot-ucf101"]


@pytest.mark.parametrize("recipe", FEW_SHOT, ids=lambda r: r.stem)
def test_few_shot_recipes_are_complete_configs(recipe, monkeypatch):
    monkeypatch.setenv("SHOTS", "4")
    monkeypatch.setenv("EPOCHS", "7")
    monkeypatch.delenv("SEED", raising=False)
    config = Config(**load_recipe(recipe.stem))  # by name, as `train --config fewshot-...` finds it
    assert "4shot-seed1" in str(config.split) and "4shot-seed1" in str(config.out)
    assert config.seed == 1 and config.student.startswith("timm:resnet") and config.head == "linear"
    assert config.eval_crop == 1.0 and config.loss_weights == (0.5, 0.5, 0.5) and config.lr == 1e-3
    assert config.temperature == 2.0 and config.weight_decay == 0.01
    if recipe.stem != "fewshot-imagenet":
        assert config.epochs == 7 and config.batch_size == 64
        # The inputs the recipe's comment describes use a template set that ships.
        name = re.search(r"--templates (\w+)", recipe.read_text()).group(1)
        assert shipped_file(TEMPLATES, name) is not None
    monkeypatch.setenv("SEED", "3")
    assert Config(**load_recipe(recipe.stem)).seed == 3


def test_an_unset_recipe_variable_is_refused(monkeypatch, tmp_path):
    monkeypatch.delenv("SHOTS", raising=False)
    monkeypatch.setenv("EPOCHS", "7")
    with pytest.raises(UserError, match=r"split uses \$\{SHOTS\}; set it, e.g. SHOTS=... dho-pipeline train --config "
                                        "fewshot-dtd"):
        load_recipe("fewshot-dtd")
    monkeypatch.setenv("SHOTS", "2")
    monkeypatch.setenv("EPOCHS", "many")
    with pytest.raises(UserError, match="epochs = 'many' is not a number"):
        load_recipe("fewshot-dtd")
    result = cli("train", "--config", "fewshot-dtd", expect_exit=1)
    assert "is not a number" in result.output and "Traceback" not in result.output
