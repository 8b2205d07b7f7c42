"""Nothing the project reads is unpickled: every torch.load is weights_only, and a checkpoint (or
weights file) that carries a code-running pickle is refused while the code never runs."""

from __future__ import annotations

import ast

import numpy as np
import pytest
import torch
from fault_helpers import (  # noqa: F401  (one_torch_thread is an autouse fixture)
    REPO, assert_clean_error, cache_args, invoke, one_torch_thread, trainable_dataset,
)
from helpers import random_image

SOURCES = sorted([*(REPO / "dho_pipeline").rglob("*.py"), *(REPO / "stages").rglob("*.py")])


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_every_torch_load_is_weights_only_and_nothing_is_unpickled():
    loads, problems = [], []
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        where = lambda node: f"{path.relative_to(REPO)}:{node.lineno}"  # noqa: E731
        for node, name in _calls(tree):
            keywords = {k.arg: k.value for k in node.keywords}
            if name.endswith(("torch.load", "serialization.load")):
                loads.append(where(node))
                value = keywords.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    problems.append(f"{where(node)}: torch.load without weights_only=True")
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "dill.load", "joblib.load",
                        "pandas.read_pickle", "pd.read_pickle", "torch.jit.load", "jit.load", "marshal.loads",
                        "shelve.open"):
                problems.append(f"{where(node)}: {name}")
            if name.endswith(("np.load", "numpy.load")):
                value = keywords.get("allow_pickle")
                if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
                    problems.append(f"{where(node)}: np.load with allow_pickle")
            if name.endswith(("create_model", "create_model_and_transforms", "load_checkpoint", "load_state_dict")):
                value = keywords.get("weights_only")
                if value is not None and not (isinstance(value, ast.Constant) and value.value is True):
                    problems.append(f"{where(node)}: {name} with weights_only other than True")
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n in ("dill", "joblib", "cloudpickle", "shelve", "marshal") for n in names if n):
                    problems.append(f"{where(node)}: imports {names}")
                if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization", "pickle") \
                        and any(a.name in ("load", "loads", "Unpickler") for a in node.names):
                    problems.append(f"{where(node)}: imports a loader by name from {node.module}")
    print(f"\nFAULTS security: {len(loads)} torch.load call(s) in {len(SOURCES)} files, all weights_only: {loads}")
    assert loads, "expected at least the checkpoint loader"
    assert problems == []
    # open_clip loads --pretrained weights files itself: its default must stay weights_only.
    import inspect

    import open_clip

    assert inspect.signature(open_clip.create_model).parameters["weights_only"].default is True


class _Payload:
    """Unpickling this creates a file: the code must never run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trainable_dataset(tmp_path_factory.mktemp("security"), num_shards=2, per_shard=8)


def _train(data, out, *extra):
    return invoke("train", "--cache", data["cache"], "--manifest", data["manifest"], "--split", data["split"],
                  "--out", out, "--student", "dho-tiny-student", "--pretrained", "none", "--batch-size", "4",
                  "--workers", "0", "--epochs", "2", *extra)


def test_resume_refuses_a_poisoned_training_state(trained, tmp_path):
    run = tmp_path / "run"
    result = _train(trained, run, "--max-steps", "2", "--checkpoint-every", "1")
    assert result.exit_code == 0, result.output
    newest = sorted((run / "checkpoints").glob("step-*"))[-1]
    assert newest.name == "step-00000002"
    marker = tmp_path / "pwned.txt"
    state = torch.load(newest / "state.pt", weights_only=True)
    torch.save({**state, "positions": _Payload(str(marker))}, newest / "state.pt")
    poisoned = (newest / "state.pt").read_bytes()
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    (run / "student.pt").unlink()

    result = _train(trained, run, "--resume")
    line = assert_clean_error(result, "holds pickled objects that could run code, refused", "state.pt")
    print(f"\nFAULTS security: train --resume on a poisoned state.pt: {line[:120]}")
    assert not marker.exists(), "the pickled payload ran"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing new was saved over it
    assert (newest / "state.pt").read_bytes() == poisoned and not (run / "student.pt").exists()


def _run_with_poisoned_weights(data, tmp_path, command):
    marker = tmp_path / "pwned.txt"
    weights = tmp_path / "weights.bin"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Payload(str(marker))}, weights)
    if command == "cache-teacher":
        args = cache_args(data, tmp_path / "c.zarr")
        args[args.index("--pretrained") + 1] = weights
        result = invoke(*args)
    else:
        result = invoke("train", "--cache", data["cache"], "--manifest", data["manifest"], "--split",
                        data["split"], "--out", tmp_path / "run", "--student", "dho-tiny-student",
                        "--pretrained", weights, "--workers", "0", "--batch-size", "4")
    return result, marker


@pytest.mark.parametrize("command", ["cache-teacher", "train"])
def test_poisoned_pretrained_weights_never_run(trained, tmp_path, command):
    """--pretrained FILE goes through open_clip's loader (weights_only): refused, the payload never runs."""
    result, marker = _run_with_poisoned_weights(trained, tmp_path, command)
    assert not marker.exists(), "the pickled payload ran"
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "weights.bin" in result.output
    assert not (tmp_path / "run" / "student.pt").exists() and not (tmp_path / "c.zarr" / "shards").exists()


@pytest.mark.parametrize("command", ["predict", "evaluate", "calibrate", "export"])
def test_student_checkpoints_with_code_are_refused_and_the_code_never_runs(trained, tmp_path, command):
    """A released-format student.pt carrying a code-running pickle, handed to every command that loads one."""
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.pt"
    torch.save({"model_state_dict": {}, "alpha": 0.5, "beta": 0.5, "payload": _Payload(str(marker))}, evil)
    image = tmp_path / "x.png"
    random_image(np.random.default_rng(0), 40, 40).save(image)
    args = {
        "predict": ["predict", "--checkpoint", evil, image],
        "evaluate": ["evaluate", "--checkpoint", evil, "--data", trained["manifest"]],
        "calibrate": ["calibrate", "--checkpoint", evil, "--data", trained["manifest"], "--out", tmp_path / "o.pt"],
        "export": ["export", evil],
    }[command]
    assert_clean_error(invoke(*args), "evil.pt", "holds pickled objects that could run code, refused")
    assert not marker.exists(), "the pickled payload ran"
    assert not (tmp_path / "o.pt").exists() and not list(tmp_path.glob("*.safetensors"))


@pytest.mark.parametrize("command", ["cache-teacher", "train"])
def test_poisoned_pretrained_weights_give_one_line(trained, tmp_path, command):
    result, _ = _run_with_poisoned_weights(trained, tmp_path, command)
    line = assert_clean_error(result, "weights.bin")
    assert "weights_only" not in line or "refused" in line
