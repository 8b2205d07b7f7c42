"""train --report-to (TensorBoard hparams as numbers, W&B offline, MLflow file store, missing trackers), and
hub access through huggingface_hub (offline, unreachable and hanging proxies, the local cache)."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import BIN, cached_dataset, cli, run_command


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("trackers")
    return cached_dataset(root, num_shards=2, per_shard=12, split_options=("--percent", "25"))


def train_args(data, out, *extra):
    return ["train", "--cache", data["cache"], "--manifest", data["manifest"], "--split", data["split"], "--out", out,
            "--student", "dho-tiny-student", "--pretrained", "none", "--batch-size", "4", "--workers", "0",
            "--max-steps", "2", "--log-every", "1", *extra]


def tensorboard_hparams(run_dir: Path) -> dict:
    """The hparams TensorBoard stored: name -> number or string, as its hparams plugin holds them."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    values = {}
    for path in run_dir.rglob("events.out.tfevents*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name != "hparams":
                    continue
                data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                for name, hparam in data.session_start_info.hparams.items():
                    values[name] = hparam.number_value if hparam.HasField("number_value") else (
                        hparam.bool_value if hparam.HasField("bool_value") else hparam.string_value)
    return values


def test_tensorboard_hparams_are_numbers(data, tmp_path):
    out = tmp_path / "run"
    cli(*train_args(data, out, "--lr", "0.002"))
    hparams = tensorboard_hparams(out / "tensorboard")
    assert hparams["lr"] == pytest.approx(0.002) and hparams["batch_size"] == 4.0 and hparams["epochs"] == 32.0
    assert hparams["loss_weights/0"] == 1.0 and hparams["crop_scale/0"] == 0.5  # lists as one number per item
    assert hparams["objective"] == "dho" and hparams["eval_data"] == "none"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["wall_seconds"] > 0


def test_report_to_none_writes_no_tracker_files(data, tmp_path):
    cli(*train_args(data, tmp_path / "run", "--report-to", "none"))
    assert not (tmp_path / "run" / "tensorboard").exists() and (tmp_path / "run" / "student.pt").is_file()


@pytest.mark.parametrize("tracker,extra", [("wandb", "dho-pipeline[wandb]"), ("mlflow", "dho-pipeline[mlflow]")])
def test_a_chosen_tracker_that_is_missing_is_one_line(data, tmp_path, monkeypatch, tracker, extra):
    monkeypatch.setitem(sys.modules, tracker, None)  # the import fails, as where it is not installed
    result = cli(*train_args(data, tmp_path / "run", "--report-to", tracker), expect_exit=1)
    assert f"--report-to {tracker}: {tracker} is not installed; pip install '{extra}'" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_wandb_offline_and_mlflow_file_store_without_network(data, tmp_path):
    import mlflow  # noqa: F401  (both in the test extra: a missing one fails, never skips)
    import wandb  # noqa: F401
    out = tmp_path / "run"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("WANDB_", "MLFLOW_"))}
    env |= {"HOME": str(tmp_path / "home"), "WANDB_CACHE_DIR": str(tmp_path / "wb-cache"),
            "WANDB_CONFIG_DIR": str(tmp_path / "wb-config"), "WANDB_DATA_DIR": str(tmp_path / "wb-data"),
            "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",  # no way out
            "OMP_NUM_THREADS": "1"}
    started = time.time()
    result = run_command(BIN / "dho-pipeline", *train_args(data, out, "--report-to", "all", "--lr", "0.003"),
                         env=env, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert time.time() - started < 180

    # W&B: an offline run in RUN/wandb with the config, typed, and a history row per logged step.
    (offline,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    records = list(wandb_records(offline))
    config = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for item in r.config.update}
    assert config["lr"] == 0.003 and config["batch_size"] == 4 and config["loss_weights/0"] == 1.0
    assert sum(r.WhichOneof("record_type") == "history" for r in records) == 2

    # MLflow: a file store in RUN/mlruns with params and a metric per logged step.
    (run_dir,) = [p for p in (out / "mlruns").glob("*/*") if (p / "params").is_dir()]
    assert (run_dir / "params" / "lr").read_text() == "0.003"
    assert (run_dir / "params" / "loss_weights" / "0").read_text() == "1.0"
    steps = [line.split()[2] for line in (run_dir / "metrics" / "loss").read_text().splitlines()]
    assert steps == ["1", "2"]
    assert list((out / "tensorboard").rglob("events.out.tfevents*"))  # and TensorBoard, all three


def wandb_records(path: Path):
    """The records of an offline W&B run file (wandb 0.31 ships no reader): a 7-byte header, then LevelDB-log
    chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks, each record a protobuf."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, position, block, pending = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


# ---- hub access -----------------------------------------------------------------------------------------------

RESOLVE = """
import json, time
from dho_pipeline.clip_models import resolve_weights, _open_clip
from dho_pipeline.errors import UserError
_open_clip()
started = time.time()
try:
    print(json.dumps({"path": resolve_weights("ViT-B-32", "openai"), "seconds": time.time() - started}))
except UserError as error:
    print(json.dumps({"error": str(error), "seconds": time.time() - started}))
"""
REPO_ID, FILE = "timm/vit_base_patch32_clip_224.openai", "open_clip_model.safetensors"  # ViT-B-32 / openai


def resolve(tmp_path, **env) -> dict:
    clean = {key: value for key, value in os.environ.items()
             if not key.startswith("HF_") and key.lower() not in ("https_proxy", "http_proxy", "all_proxy", "no_proxy")}
    result = run_command(sys.executable, "-c", RESOLVE, env={**clean, "HF_HOME": str(tmp_path / "hf"), **env},
                         check=False, timeout=200)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a fresh interpreter per environment (HF_HUB_OFFLINE is read at import)
def test_offline_hub_fails_fast_naming_hf_download(tmp_path):
    outcome = resolve(tmp_path, HF_HUB_OFFLINE="1")
    assert outcome["seconds"] < 5
    assert "HF_HUB_OFFLINE is set" in outcome["error"] and f"`hf download {REPO_ID} {FILE}`" in outcome["error"]
    assert "huggingface-cli" not in outcome["error"]


@pytest.mark.slow  # a fresh interpreter per environment (HF_HUB_OFFLINE is read at import)
def test_unreachable_proxy_fails_fast_naming_it(tmp_path):
    outcome = resolve(tmp_path, HTTPS_PROXY="http://127.0.0.1:9")
    assert outcome["seconds"] < 15
    assert "cannot be reached through the proxy http://127.0.0.1:9" in outcome["error"]
    assert f"`hf download {REPO_ID} {FILE}`" in outcome["error"]


@pytest.mark.slow
def test_hanging_proxy_fails_within_the_metadata_timeout(tmp_path):
    """A proxy that accepts and never answers: huggingface_hub alone retries for minutes (389 s measured)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []

    def accept():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        outcome = resolve(tmp_path, HTTPS_PROXY=f"http://127.0.0.1:{server.getsockname()[1]}", HF_HUB_ETAG_TIMEOUT="2")
    finally:
        server.close()
        for connection in held:
            connection.close()
    assert held, "the request never went through the proxy"
    assert outcome["seconds"] < 30
    assert "Timeout" in outcome["error"] and f"`hf download {REPO_ID} {FILE}`" in outcome["error"]


@pytest.mark.slow  # a fresh interpreter per environment (HF_HUB_OFFLINE is read at import)
def test_weights_in_the_local_cache_need_no_network(tmp_path):
    """A file in the Hugging Face cache layout is used as it is, offline and behind a dead proxy alike."""
    repo = tmp_path / "hf" / "hub" / f"models--{REPO_ID.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / FILE).write_bytes(b"weights")
    outcome = resolve(tmp_path, HF_HUB_OFFLINE="1", HTTPS_PROXY="http://127.0.0.1:9")
    assert outcome.get("path") == str(repo / "snapshots" / commit / FILE), outcome
    assert outcome["seconds"] < 2
