"""The package as a user gets it: a built wheel, installed in a fresh environment, run from elsewhere."""

from __future__ import annotations

import json
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from helpers import write_shards

REPO = Path(__file__).resolve().parents[1]


def _run(*args, cwd=None, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.slow
def test_wheel_installs_and_finds_its_defaults_outside_the_repository(tmp_path):
    # Build the wheel from a copy of the checkout (setuptools writes build/ beside the sources; no network:
    # the build backend comes from this environment).
    source = tmp_path / "source"
    for folder in ("dho_pipeline", "stages", "manifests"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    _run(sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist")
    wheel = next((tmp_path / "dist").glob("dho_pipeline-*.whl"))

    # A fresh venv that borrows this environment's third-party packages (torch, open_clip, ...) as a plain
    # path entry, so that this environment's editable install of dho-pipeline is NOT active there.
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    purelib = Path(_run(venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
                   .stdout.strip())
    # Every site-packages folder this interpreter imports from (a venv may reach another through a .pth file).
    borrowed = list(dict.fromkeys(p for p in [sysconfig.get_paths()["purelib"], *site.getsitepackages(), *sys.path]
                                  if p.endswith("site-packages") and Path(p).is_dir()))
    (purelib / "borrowed.pth").write_text("\n".join(borrowed) + "\n")
    _run(venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", wheel)

    # Run from a folder that is not the repository.
    work = tmp_path / "elsewhere"
    write_shards(work / "shards", num_shards=1, per_shard=3)
    where = _run(venv / "bin" / "python", "-c", "import dho_pipeline, sys; print(dho_pipeline.__file__)", cwd=work)
    assert Path(where.stdout.strip()).is_relative_to(purelib), where.stdout  # the installed copy, not the checkout
    no_stages = _run(venv / "bin" / "python", "-c", "import stages", cwd=work, check=False)
    assert no_stages.returncode != 0 and "No module named 'stages'" in no_stages.stderr  # nothing named `stages`

    cli = venv / "bin" / "dho-pipeline"
    _run(cli, "manifest", "shards/*.tar", "--out", "m.json", cwd=work)
    # No --classnames / --templates: the packaged ImageNet class names (longer than the 5 labels imply,
    # so allowed explicitly) and the paper's templates.
    _run(cli, "cache-teacher", "--manifest", "m.json", "--out", "c.zarr", "--teacher", "dho-test-vit",
         "--pretrained", "none", "--workers", "0", "--allow-unused-classes", cwd=work)
    info = json.loads(_run(cli, "cache", "info", "c.zarr", "--json", cwd=work).stdout)
    assert info["num_classes"] == 1000 and info["num_templates"] == 7 and info["complete_shards"] == 1
    # The data sets' templates and ImageNet-A/R's class lists ship too, found by name.
    shipped_lists = _run(venv / "bin" / "python", "-c", "from dho_pipeline.prompts import read_templates; "
                         "from dho_pipeline.class_subsets import read_class_subset as r; "
                         "print(read_templates('oxford_pets'), len(r('imagenet-a', 1000)), len(r('imagenet-r', 1000)))",
                         cwd=work)
    assert shipped_lists.stdout.split() == ["['a", "photo", "of", "a", "{},", "a", "type", "of", "pet.']", "200", "200"]
    # A recipe that ships with the package is found by name (it then asks for the ImageNet manifest it names).
    shipped = _run(cli, "train", "--config", "vit-b16-1pct", cwd=work, check=False)
    assert shipped.returncode == 1 and "data/imagenet-train.json does not exist" in shipped.stderr, shipped.stderr
