"""Stage two: train a dual-head CLIP student against a teacher cache (DHO, arXiv 2505.07675).

    dho-pipeline train --cache C.zarr --manifest M.json --split S.json --out runs/b16-1pct
    torchrun --nproc_per_node 8 --no-python dho-pipeline train --config manifests/recipes/vit-b16-1pct.toml ...

The teacher is never loaded: its outputs come from the cache, per view. Each optimiser step takes
`batch_size` labeled and `batch_size` unlabeled samples (global, over all processes and accumulation
micro-steps); an epoch is one pass over the unlabeled set, the labeled stream cycles. Losses (DHO):
CE(ce_head(x_l), y) + KD(kd_head(x_l)) + KD(kd_head(x_u)), KD = KL(teacher_T || student_T) * T^2.

Learning rate: linear warm-up from 0 to `lr` over the warm-up steps, then cosine to 0 over the rest.
(The reference multiplies the two schedules, so its cosine already decays during warm-up; ours starts
after it.) The warm-up is capped at a tenth of the run, so short runs are not all warm-up.

Outputs in RUN_DIR: `config.json` (resolved), `metrics.jsonl`, `tensorboard/`, `checkpoints/step-N/`
(resumable state, written whole or not at all), and `student.pt` in the released checkpoint format.
"""

from __future__ import annotations

import json
import math
import time
import tomllib
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from dho_pipeline.errors import UserError

from .common import PRECISIONS, append_jsonl, log, reduce_sum

OBJECTIVES = ("dho", "single-head", "ce", "kd")


@dataclass(frozen=True, kw_only=True)
class Config:
    cache: Path | None  # the teacher cache; None only with teacher_online
    manifest: Path
    split: Path
    out: Path
    student: str = "ViT-B-16-quickgelu"  # open_clip name or model-config JSON
    pretrained: str = "openai"  # open_clip tag, local weights file, or "none"
    objective: str = "dho"  # dho | single-head | ce | kd
    tail: str = "bucket"  # teacher mass outside the cached top-k: "bucket" or "uniform"
    temperature: float = 2.0  # KD temperature; the cache must hold it (or every logit)
    loss_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # CE, KD labeled, KD unlabeled
    epochs: int = 32  # passes over the unlabeled set
    batch_size: int = 256  # per optimiser step, global, for each of the labeled and unlabeled parts
    lr: float = 5e-5
    weight_decay: float = 0.05
    warmup_steps: int = 5000  # capped at a tenth of the run
    precision: str | None = None  # fp32 | bf16 | fp16; default bf16 on GPU, fp32 on CPU
    compile: bool | None = None  # torch.compile the student's training step (and an online teacher); default: on GPUs
    grad_accum: int = 1  # micro-steps per optimiser step
    workers: int = 4  # DataLoader processes per stream and rank
    seed: int = 0  # data order, views per epoch
    resume: bool = False  # continue the run in `out` from its newest complete checkpoint
    eval_data: Path | None = None  # a manifest to evaluate on after each epoch (logged, never used to pick)
    eval_batch_size: int = 256  # per process
    checkpoint_every: int = 0  # optimiser steps between checkpoints; 0: at each epoch end
    keep_checkpoints: int = 2
    log_every: int = 10  # optimiser steps between metrics lines
    max_steps: int | None = None  # stop after this many optimiser steps (the schedule still spans all epochs)
    device: str | None = None
    classnames: Path | None = None  # with a cache: must equal its class list (a guard); online: the classes
    templates: Path | None = None  # online teacher only: prompt templates (default: the paper's 7)
    teacher_online: bool = False  # run the teacher in the loop on each view (the reference's way), no cache
    teacher: str | None = None  # online teacher: open_clip name or config JSON
    teacher_pretrained: str | None = None  # online teacher: tag, weights file or "none"
    crop_scale: tuple[float, float] = (0.5, 1.0)  # online teacher: RandomResizedCrop area range of the views

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise UserError(f"--objective must be one of {', '.join(OBJECTIVES)}, not {self.objective!r}")
        if self.tail not in ("bucket", "uniform"):
            raise UserError("--tail must be 'bucket' or 'uniform'")
        if self.temperature <= 0 or self.lr <= 0 or self.epochs < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise UserError("--temperature, --lr, --epochs, --batch-size and --grad-accum must be positive")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}")
        if len(self.loss_weights) != 3:
            raise UserError("loss_weights takes three numbers: CE, KD on labeled, KD on unlabeled")
        if self.cache is None and not self.teacher_online:
            raise UserError("train needs --cache (or --teacher-online)")
        if self.teacher_online and not (self.teacher and self.teacher_pretrained):
            raise UserError("--teacher-online needs --teacher and --teacher-pretrained")

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))


# Settings that shape the training trajectory: a resumed run must not change them.
_TRAJECTORY = ("student", "pretrained", "objective", "tail", "temperature", "loss_weights", "epochs",
               "batch_size", "lr", "weight_decay", "warmup_steps", "grad_accum", "seed", "teacher_online",
               "teacher", "teacher_pretrained", "crop_scale")


def load_recipe(path: Path) -> dict:
    """A recipe: a TOML file of Config fields (paths relative to the working directory)."""
    try:
        recipe = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"recipe {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"recipe {path} is not valid TOML ({error})") from None
    known = {f.name for f in fields(Config)}
    recipe = recipe.get("train", recipe)
    unknown = sorted(set(recipe) - known - {"about"})
    if unknown:
        raise UserError(f"recipe {path}: unknown setting(s) {', '.join(unknown)}")
    recipe.pop("about", None)
    for name in ("cache", "manifest", "split", "out", "eval_data"):
        if name in recipe:
            recipe[name] = Path(recipe[name])
    if "loss_weights" in recipe:
        recipe["loss_weights"] = tuple(float(w) for w in recipe["loss_weights"])
    return recipe


def lr_at(step: int, config: Config, total_steps: int) -> float:
    warmup = min(config.warmup_steps, max(1, total_steps // 10))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _micro_batch(config: Config, world: int) -> int:
    """Samples per stream, micro-step and process: the global batch split over processes and accumulation."""
    if config.batch_size % (world * config.grad_accum):
        raise UserError(
            f"--batch-size {config.batch_size} must be divisible by processes x --grad-accum ({world} x {config.grad_accum})"
        )
    return config.batch_size // (world * config.grad_accum)


@dataclass
class _Plan:
    """Step arithmetic, identical on every rank."""

    steps_per_epoch: int  # optimiser steps: one pass over the unlabeled set
    total_steps: int

    @classmethod
    def of(cls, config: Config, num_unlabeled: int) -> "_Plan":
        steps_per_epoch = max(1, num_unlabeled // config.batch_size)
        return cls(steps_per_epoch, steps_per_epoch * config.epochs)


def _check_inputs(config: Config):
    """Everything that can be refused is refused here, before the student is built."""
    from dho_pipeline.cache_store import TeacherCache
    from dho_pipeline.manifest import load_manifest
    from dho_pipeline.split import load_split
    from dho_pipeline.prompts import read_classnames
    from dho_pipeline.student_data import temperature_column

    manifest = load_manifest(config.manifest)
    split = load_split(config.split)
    if config.teacher_online:
        from dho_pipeline.prompts import read_templates

        from dho_pipeline.package_data import IMAGENET_CLASSNAMES, IMAGENET_TEMPLATES

        classnames = read_classnames(config.classnames or IMAGENET_CLASSNAMES)
        templates = read_templates(config.templates or IMAGENET_TEMPLATES)
        split.check_manifest(manifest, where=f"split {config.split}")
        manifest.check_files()
        manifest.check_labels(len(classnames))
        return manifest, None, split, classnames, templates
    cache = TeacherCache.open(config.cache)
    if cache.spec.manifest_fingerprint != manifest.fingerprint:
        raise UserError(f"cache {config.cache} was built from another manifest than {config.manifest}; use its own manifest")
    split.check_manifest(manifest, where=f"split {config.split}")
    incomplete = cache.incomplete_shards()
    if incomplete:
        names = ", ".join(cache.spec.shards[i]["name"] for i in incomplete[:3])
        raise UserError(
            f"cache {config.cache} is missing {len(incomplete)} shard(s) ({names}{' ...' if len(incomplete) > 3 else ''}); "
            "rerun cache-teacher to finish it"
        )
    if config.objective != "ce":
        temperature_column(cache, config.temperature)
    if config.classnames is not None and read_classnames(config.classnames) != cache.spec.classnames:
        raise UserError(
            f"cache {config.cache} was built for another class list than {config.classnames}; "
            "use a cache built with these class names"
        )
    manifest.check_files()
    manifest.check_labels(cache.spec.num_classes)
    return manifest, cache, split, cache.spec.classnames, cache.spec.templates


def _streams(config, manifest, cache, split, state, micro_batch, student_size, positions, teacher_size=None):
    """DataLoaders for the labeled and unlabeled streams, starting at the saved positions."""
    import numpy as np
    import torch

    from dho_pipeline.student_data import (
        IdStream, PreloadedRows, SampleTable, ShardRows, StudentBatches, labeled_order, unlabeled_order,
    )

    table = SampleTable.from_manifest(manifest)
    # Samples stage one could not decode (--on-error skip) have no teacher targets: skip and count them.
    usable = np.ones(len(table.shard), bool)
    first_id = np.cumsum([0] + [s.num_samples for s in manifest.shards])
    for index, shard in enumerate(manifest.shards if cache is not None else []):
        missing = {m["key"] for m in (cache.shard_attrs(index) or {}).get("missing", [])}
        for position in (p for p, key in enumerate(shard.keys) if key in missing):
            usable[first_id[index] + position] = False
    labeled = table.ids_of(split.labeled_mask(manifest))
    unlabeled = table.ids_of(split.unlabeled_mask(manifest))
    counts = {"labeled": int(usable[labeled].sum()), "unlabeled": int(usable[unlabeled].sum()),
              "skipped_missing": int((~usable[labeled]).sum() + (~usable[unlabeled]).sum())}
    labeled, unlabeled = labeled[usable[labeled]], unlabeled[usable[unlabeled]]
    if len(labeled) == 0:
        raise UserError(f"split {config.split} has no labeled samples that the cache holds")

    rank, world = state.process_index, state.num_processes
    if cache is None:  # online teacher: a fresh random view per sample and epoch, rendered for both models
        return _online_streams(config, table, labeled, unlabeled, rank, world, micro_batch, student_size,
                               teacher_size, positions), counts, table, labeled
    num_views = cache.spec.num_views

    def loader(stream, rows, first):
        dataset = StudentBatches(table, stream, student_size, rows=rows, num_views=num_views, first_batch=first)
        return torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=config.workers, pin_memory=state.device.type == "cuda",
            persistent_workers=False, prefetch_factor=4 if config.workers else None,
        )

    # The CE-only baseline reads no teacher targets, but shows the same cached views as the others.
    temperature = config.temperature if config.objective != "ce" else cache.spec.temperatures[0]
    labeled_stream = IdStream(labeled_order(labeled, config.seed, rank, world), micro_batch)
    streams = {"labeled": loader(labeled_stream, PreloadedRows(cache, table, labeled, temperature), positions["labeled"])}
    if config.objective != "ce":
        unlabeled_stream = IdStream(unlabeled_order(table, unlabeled, config.seed, rank, world), micro_batch)
        streams["unlabeled"] = loader(unlabeled_stream, ShardRows(cache, table, temperature), positions["unlabeled"])
    return streams, counts, table, labeled


def _online_streams(config, table, labeled, unlabeled, rank, world, micro_batch, student_size, teacher_size, positions):
    import torch

    from dho_pipeline.student_data import IdStream, StudentBatches, labeled_order, unlabeled_order
    from dho_pipeline.views import VIEW0_WHOLE, ViewPolicy

    # Views 1, 2, 3, ... at stream epochs 0, 1, 2, ...: RandomResizedCrop + flip, as stage one draws them.
    policy = ViewPolicy(num_views=2**31 - 1, seed=config.seed, view0=VIEW0_WHOLE, crop_scale=tuple(config.crop_scale))

    def loader(stream, first):
        dataset = StudentBatches(table, stream, student_size, first_batch=first, extra_sizes=(teacher_size,),
                                 online_views=policy)
        return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=config.workers,
                                           persistent_workers=False, prefetch_factor=4 if config.workers else None)

    return {
        "labeled": loader(IdStream(labeled_order(labeled, config.seed, rank, world), micro_batch), positions["labeled"]),
        "unlabeled": loader(IdStream(unlabeled_order(table, unlabeled, config.seed, rank, world), micro_batch),
                            positions["unlabeled"]),
    }


def run(config: Config) -> dict:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration
    from tqdm import tqdm

    from dho_pipeline.checkpoints import (
        complete_training_states, load_checkpoint_file, remove_partial_training_states, save_release_checkpoint,
        save_training_state,
    )
    from dho_pipeline.clip_models import load_clip
    from dho_pipeline.pixels import Normalizer
    from dho_pipeline.student import build_student

    from .common import process_state, resolve_compile, resolve_precision

    # ---- setup: inputs checked, run directory claimed --------------------------------------------
    manifest, cache, split, classnames, templates = _check_inputs(config)
    out = Path(config.out)
    state = process_state(config.device)
    precision = resolve_precision(config.precision, state.device)
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    saved = complete_training_states(out)
    if saved and not config.resume:
        raise UserError(f"{out} already holds a training run; pass --resume to continue it, or choose another --out")
    if config.resume and (out / "config.json").exists():
        previous = json.loads((out / "config.json").read_text())
        changed = [k for k in _TRAJECTORY if previous.get(k) != config.to_json()[k]]
        if changed:
            raise UserError(f"--resume: {out} was trained with different {', '.join(changed)}; resume with the same settings")
    state.wait_for_everyone()
    # Only DHO uses both heads; the baselines leave one idle, which DDP must be told about.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=config.objective != "dho")
    accelerator = Accelerator(
        cpu=state.device.type == "cpu", mixed_precision=mixed, kwargs_handlers=[ddp],
        log_with="tensorboard", project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tensorboard")),
    )
    device = accelerator.device
    torch.manual_seed(config.seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        remove_partial_training_states(out)
        (out / "config.json").write_text(json.dumps(config.to_json(), indent=2) + "\n")

    # ---- model and optimiser ----------------------------------------------------------------------
    loaded = load_clip(config.student, config.pretrained)
    student = build_student(loaded, classnames, templates, device=device)
    normalize = Normalizer(loaded.preprocess.mean, loaded.preprocess.std, device)
    student_size = loaded.preprocess.image_size
    preprocess = loaded.preprocess.to_json()
    del loaded
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    # ---- resume: model, optimiser and data position from the newest complete checkpoint ------------
    step, positions = 0, {"labeled": 0, "unlabeled": 0}
    if config.resume and saved:
        resumed = load_checkpoint_file(saved[-1] / "state.pt")
        student.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        step, positions = resumed["step"], resumed["positions"]
        if accelerator.is_main_process:
            log.info("resuming %s from step %d", out, step)
    student, optimizer = accelerator.prepare(student, optimizer)
    # The training forward is compiled; evaluation keeps the eager model (its batch sizes and
    # train/eval mode would each cost a recompile). DDP's hooks stay on the path: the compiled call
    # goes through the prepared module.
    compiled = resolve_compile(config.compile, device)
    train_forward = torch.compile(student, dynamic=False) if compiled else student

    # ---- data -------------------------------------------------------------------------------------
    micro_batch = _micro_batch(config, accelerator.num_processes)
    teacher = _online_teacher(config, classnames, templates, device, precision, compiled, micro_batch) \
        if config.teacher_online else None
    streams, counts, table, labeled_ids = _streams(
        config, manifest, cache, split, accelerator.state, micro_batch, student_size, positions,
        teacher_size=teacher["size"] if teacher else None,
    )
    plan = _Plan.of(config, counts["unlabeled"])
    last_step = plan.total_steps if config.max_steps is None else min(plan.total_steps, config.max_steps)
    evaluation = _evaluator(config, accelerator, student, normalize, student_size, classnames)
    if accelerator.is_main_process:
        log.info(
            "%d labeled + %d unlabeled samples (%d missing from the cache, skipped); %d steps per epoch, %d in all; "
            "%d + %d per step on each of %d process(es)",
            counts["labeled"], counts["unlabeled"], counts["skipped_missing"], plan.steps_per_epoch, plan.total_steps,
            micro_batch, micro_batch, accelerator.num_processes,
        )
        accelerator.init_trackers("dho", config={k: str(v) for k, v in config.to_json().items()})

    # ---- the loop ---------------------------------------------------------------------------------
    iterators = {name: iter(loader) for name, loader in streams.items()}
    metrics_path = out / "metrics.jsonl"
    window = {"samples": 0, "data": 0.0, "started": time.perf_counter(), "sums": {}}
    last_eval = None
    bar = tqdm(total=last_step, initial=step, unit="step", desc="train", disable=not accelerator.is_main_process,
               dynamic_ncols=True)
    with bar:  # closed (and its line ended) on the way out, errors included
        while step < last_step:
            lr = lr_at(step, config, plan.total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            student.train()
            for micro in range(config.grad_accum):
                fetch_started = time.perf_counter()
                batches = {name: next(iterator) for name, iterator in iterators.items()}
                window["data"] += time.perf_counter() - fetch_started
                for name in positions:
                    positions[name] += name in batches
                sync = micro == config.grad_accum - 1
                if teacher is not None:
                    _add_teacher_logits(teacher, batches)
                with (nullcontext() if sync else accelerator.no_sync(student)), accelerator.autocast():
                    losses = _losses(config, train_forward, batches, normalize)
                    loss = sum(losses.values()) / config.grad_accum
                accelerator.backward(loss)
                for name, value in losses.items():  # summed on the device: no sync per step
                    window["sums"][name] = window["sums"].get(name, 0.0) + value.detach().float() / config.grad_accum
                window["samples"] += sum(len(b["labels"]) for b in batches.values()) * accelerator.num_processes
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            epoch = (step - 1) // plan.steps_per_epoch
            bar.update(1)

            # ---- log ----
            if step % config.log_every == 0 or step == last_step:
                elapsed = time.perf_counter() - window["started"]
                steps_in_window = config.log_every if step % config.log_every == 0 else step % config.log_every
                record = {"step": step, "epoch": epoch, "lr": lr,
                          **{k: v.item() / steps_in_window for k, v in window["sums"].items()},
                          "samples_per_second": window["samples"] / max(elapsed, 1e-9),
                          "data_wait_fraction": window["data"] / max(elapsed, 1e-9)}
                record["loss"] = sum(v for k, v in record.items() if k.startswith(("ce_", "kd_")))
                if accelerator.is_main_process:
                    append_jsonl(metrics_path, record)
                    bar.set_postfix({k: f"{record[k]:.3g}" for k in ("loss", *window["sums"], "lr")} | {"img/s": f"{record['samples_per_second']:.0f}"})
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
                window = {"samples": 0, "data": 0.0, "started": time.perf_counter(), "sums": {}}

            # ---- evaluate and checkpoint, at epoch ends (and every checkpoint_every steps) ----
            epoch_end = step % plan.steps_per_epoch == 0
            if epoch_end and evaluation is not None:
                last_eval = evaluation()
                if accelerator.is_main_process:
                    append_jsonl(metrics_path, {"step": step, "epoch": epoch, "eval": last_eval})
                accelerator.log({f"eval/{k}": v for k, v in last_eval.items()}, step=step)
            if epoch_end or step == last_step or (config.checkpoint_every and step % config.checkpoint_every == 0):
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    payload = {"model": accelerator.unwrap_model(student).state_dict(), "optimizer": optimizer.state_dict(),
                               "step": step, "positions": dict(positions), "epoch": epoch}
                    save_training_state(out, step, payload, keep=config.keep_checkpoints)
                accelerator.wait_for_everyone()

    # ---- the released checkpoint ------------------------------------------------------------------
    finished = step >= plan.total_steps
    epoch = (step - 1) // plan.steps_per_epoch if step else 0
    summary = {"steps": step, "total_steps": plan.total_steps, "finished": finished, "epoch": epoch,
               "eval": last_eval, **counts}
    if accelerator.is_main_process:
        metadata = {
            "format": "dho-pipeline-student", "version": 1,
            "student": {"model": config.student, "pretrained": config.pretrained, "preprocess": preprocess},
            "classnames": classnames, "templates": templates,
            "config": config.to_json(), "cache_fingerprint": _cache_fingerprint(cache) if cache else None,
            "manifest_fingerprint": manifest.fingerprint, "split_fingerprint": split.fingerprint,
            "steps": step, "finished": finished, "calibrated_on": None,
            # so that `calibrate` can refuse data the student was trained on
            "labeled_keys": sorted(table.key(int(i)) for i in labeled_ids),
        }
        acc = last_eval["mix"] if last_eval else None
        save_release_checkpoint(out / "student.pt", accelerator.unwrap_model(student).state_dict(),
                                epoch=epoch, acc=acc, alpha=0.5, beta=0.5, metadata=metadata)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    append_jsonl(out / "ranks.jsonl", {"rank": accelerator.process_index, "steps": step, "positions": positions})
    accelerator.wait_for_everyone()
    accelerator.end_training()  # closes the trackers and the process group
    return summary


def _cache_fingerprint(cache) -> str:
    from dho_pipeline.hashing import fingerprint_json

    return fingerprint_json(cache.spec.to_attrs())


def _losses(config: Config, student, batches: dict, normalize) -> dict:
    """The objective's loss parts for one micro-batch; labeled and unlabeled go through one forward."""
    import torch
    import torch.nn.functional as F

    from dho_pipeline.kd import kd_full, kd_topk, log_partition_from_topk

    w_ce, w_kl, w_ku = config.loss_weights
    labeled = batches["labeled"]
    parts = [labeled] + ([batches["unlabeled"]] if "unlabeled" in batches else [])
    pixels = torch.cat([normalize(b["pixels"]) for b in parts])
    ce_logits, kd_logits = student(pixels)
    n = len(labeled["labels"])
    labels = labeled["labels"].to(pixels.device)

    def kd(logits, batch):
        if "teacher_logits" in batch:  # online teacher: its full logits
            return kd_full(logits, batch["teacher_logits"], config.temperature)
        device = logits.device
        log_partition = batch["log_partition"].to(device)
        topk_logit = batch["topk_logit"].to(device)
        if torch.isnan(log_partition).any():  # a full-logit cache without this T
            log_partition = log_partition_from_topk(topk_logit, config.temperature)
        return kd_topk(logits, batch["topk_index"].to(device), topk_logit, log_partition, config.temperature, config.tail)

    losses = {}
    if config.objective in ("dho", "single-head", "ce"):
        losses["ce_labeled"] = w_ce * F.cross_entropy(ce_logits[:n].float(), labels)
    if config.objective in ("dho", "kd"):
        losses["kd_labeled"] = w_kl * kd(kd_logits[:n], labeled)
        losses["kd_unlabeled"] = w_ku * kd(kd_logits[n:], batches["unlabeled"])
    if config.objective == "single-head":  # one head (the CE head) takes both losses
        losses["kd_labeled"] = w_kl * kd(ce_logits[:n], labeled)
        losses["kd_unlabeled"] = w_ku * kd(ce_logits[n:], batches["unlabeled"])
    return losses


def _online_teacher(config: Config, classnames, templates, device, precision, compiled, batch_size) -> dict:
    """The zero-shot teacher, for --teacher-online: built and run exactly as cache-teacher runs it."""
    from dho_pipeline.clip_models import class_text_embeddings, load_clip
    from dho_pipeline.pixels import Normalizer
    from dho_pipeline.teacher import TeacherRunner, ZeroShotTeacher

    from .common import precision_dtype

    loaded = load_clip(config.teacher, config.teacher_pretrained)
    embeddings = class_text_embeddings(loaded, classnames, templates, normalize=True, device=device)
    model = TeacherRunner(ZeroShotTeacher(loaded.model.visual, embeddings).to(device),
                          dtype=precision_dtype(precision), compile=compiled, batch_size=batch_size)
    return {"model": model, "size": loaded.preprocess.image_size,
            "normalize": Normalizer(loaded.preprocess.mean, loaded.preprocess.std, device)}


def _add_teacher_logits(teacher: dict, batches: dict) -> None:
    key = f"pixels_{teacher['size'][0]}"
    for batch in batches.values():
        # clone: the runner's inference-mode logits become an ordinary tensor that the loss may save
        batch["teacher_logits"] = teacher["model"](teacher["normalize"](batch[key])).clone()


def _evaluator(config: Config, accelerator, student, normalize, student_size, cache_classnames):
    """A function that evaluates on --eval-data (each sample once across ranks), or None."""
    if config.eval_data is None:
        return None
    import torch

    from dho_pipeline.evaluation import collect_logits, finish_statistics, sufficient_statistics
    from dho_pipeline.manifest import load_manifest
    from dho_pipeline.student_data import FiniteIdStream, SampleTable, StudentBatches

    eval_manifest = load_manifest(config.eval_data)
    eval_manifest.check_files()
    table = SampleTable.from_manifest(eval_manifest)
    num_classes = len(cache_classnames)
    if (table.label < 0).any() or (table.label >= num_classes).any():
        raise UserError(f"--eval-data {config.eval_data}: every sample needs a label in 0..{num_classes - 1}")
    stream = FiniteIdStream(torch.arange(len(table.label)).numpy(), config.eval_batch_size,
                            accelerator.process_index, accelerator.num_processes)

    def evaluate() -> dict:
        dataset = StudentBatches(table, stream, student_size, num_batches=stream.num_batches)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=min(config.workers, stream.num_batches))
        logits = collect_logits(student, loader, normalize, accelerator.autocast)
        # Sums over ranks: every sample counted exactly once.
        stats = sufficient_statistics(logits, 0.5, 0.5, num_classes)
        report = finish_statistics(reduce_sum(accelerator.state, stats), num_classes)
        return {head: report[head]["top1"] for head in ("ce", "kd", "mix")} | {"samples": report["samples"]}

    return evaluate
