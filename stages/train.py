"""Stage two: train a dual-head CLIP student against a teacher cache (DHO, arXiv 2505.07675).

    dho-pipeline train --cache C.zarr --manifest M.json --split S.json --out runs/b16-1pct
    torchrun --nproc_per_node 8 --no-python dho-pipeline train --config vit-b16-1pct ...

The teacher is never loaded: its outputs come from the cache, per view. Each optimiser step takes
`batch_size` labeled and `batch_size` unlabeled samples (global, over all processes and accumulation
micro-steps); an epoch is one pass over the unlabeled set, the labeled stream cycles. The losses are
the library's (dho_pipeline.objectives): for DHO, CE(ce_head(x_l), y) + KD(kd_head(x_l)) + KD(kd_head(x_u)).
The learning rate follows dho_pipeline.schedule.warmup_cosine.

Outputs in RUN_DIR: `config.json` (resolved), `metrics.jsonl`, `tensorboard/`, `checkpoints/step-N/`
(resumable state, written whole or not at all), and `student.pt` in the released checkpoint format.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from dho_pipeline.errors import UserError

from .common import PRECISIONS, MetricsWindow, append_jsonl, log, reduce_sum
from .options import FloatList, read_recipe, setting

OBJECTIVES = ("dho", "single-head", "ce", "kd")


@dataclass(frozen=True, kw_only=True)
class Config:
    cache: Path | None = setting(None, help="Teacher cache (from cache-teacher); not needed with --teacher-online.")
    manifest: Path = setting(help="Manifest the cache was built from.")
    split: Path = setting(help="Label split (from split).")
    out: Path = setting(help="Run directory.")
    student: str = setting("ViT-B-16-quickgelu", help="open_clip model name or model-config JSON.")
    pretrained: str = setting("openai", help="open_clip tag, local weights file, or 'none'.")
    objective: str = setting("dho", choices=OBJECTIVES, help="What the student learns from (dho_pipeline.objectives).")
    tail: str = setting("bucket", choices=("bucket", "uniform"), help="Teacher mass outside the cached top-k.")
    temperature: float = setting(2.0, help="KD temperature; the cache must hold it (or every logit).")
    loss_weights: tuple[float, float, float] = setting(
        (1.0, 1.0, 1.0), help="Weights of CE on labeled, KD on labeled, KD on unlabeled.")
    epochs: int = setting(32, help="Passes over the unlabeled set.")
    batch_size: int = setting(256, help="Labeled (and as many unlabeled) samples per optimiser step, global.")
    lr: float = setting(5e-5, help="Peak learning rate (AdamW).")
    weight_decay: float = setting(0.05, help="AdamW weight decay.")
    warmup_steps: int = setting(5000, help="Linear warm-up steps, capped at a tenth of the run.")
    precision: str | None = setting(None, choices=PRECISIONS, default_text="bf16 on GPU, fp32 on CPU",
                                    help="Autocast precision of the training step.")
    compile: bool | None = setting(None, default_text="on GPUs",
                                   help="torch.compile the training step (and an online teacher).")
    grad_accum: int = setting(1, help="Micro-steps per optimiser step.")
    workers: int = setting(4, help="Data-loading processes per stream and process.")
    seed: int = setting(0, help="Seed of the data order and of the view each sample shows per epoch.")
    resume: bool = setting(False, help="Continue the run in --out from its newest complete checkpoint.")
    eval_data: Path | None = setting(None, help="Manifest to evaluate on after each epoch (logged, never used to pick).")
    eval_batch_size: int = setting(256, help="Evaluation images per batch and process.")
    checkpoint_every: int = setting(0, help="Steps between checkpoints; 0: at each epoch end.")
    keep_checkpoints: int = setting(2, help="Complete checkpoints kept (older ones are pruned).")
    log_every: int = setting(10, help="Steps between metrics lines.")
    max_steps: int | None = setting(None, help="Stop after this many steps (the schedule still spans all epochs).")
    device: str | None = setting(None, default_text="this process's GPU, else cpu", help="Device, e.g. cuda, cpu.")
    classnames: Path | None = setting(
        None, default_text="the manifest's (classes.txt beside its shards), else with a cache the cache's, online ImageNet's",
        help="With a cache: refuse unless it was built for these class names. Online: the classes.")
    allow_unused_classes: bool = setting(False, help="Online: accept a default class list (the manifest's, "
                                         "ImageNet's) longer than the labels imply (a file you name, or a cache's list, gets a warning only).")
    templates: Path | None = setting(None, default_text="the paper's 7 ImageNet templates",
                                     help="Online teacher: prompt templates, one per line with {}.")
    teacher_online: bool = setting(False, help="Run the teacher on each view in the loop (the reference's way), no cache.")
    teacher: str | None = setting(None, help="Online teacher: open_clip model name or config JSON.")
    teacher_pretrained: str | None = setting(None, help="Online teacher: open_clip tag, weights file or 'none'.")
    crop_scale: tuple[float, float] = setting((0.5, 1.0), type=FloatList(),
                                              help="Online teacher: RandomResizedCrop area range of the views.")

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

    def objective_spec(self):
        from dho_pipeline.objectives import Objective

        return Objective(self.objective, tuple(self.loss_weights), self.temperature, self.tail)


# Settings that shape the training trajectory: a resumed run must not change them.
_TRAJECTORY = ("student", "pretrained", "objective", "tail", "temperature", "loss_weights", "epochs",
               "batch_size", "lr", "weight_decay", "warmup_steps", "grad_accum", "seed", "teacher_online",
               "teacher", "teacher_pretrained", "crop_scale")


def load_recipe(path: Path) -> dict:
    """A recipe: a TOML file of Config fields (paths relative to the working directory), given as a path or
    as the name of a recipe that ships with the package (`vit-b16-1pct`, see manifests/recipes/)."""
    from dho_pipeline.package_data import RECIPES

    return read_recipe(path, Config, RECIPES)


def _micro_batch(config: Config, world: int) -> int:
    """Samples per stream, micro-step and process: the global batch split over processes and accumulation."""
    if config.batch_size % (world * config.grad_accum):
        raise UserError(
            f"--batch-size {config.batch_size} must be divisible by processes x --grad-accum ({world} x {config.grad_accum})"
        )
    return config.batch_size // (world * config.grad_accum)


def _check_inputs(config: Config):
    """Everything that can be refused is refused here, before the student is built.

    Returns the manifest, the cache reader (None with an online teacher), the split, class names, templates.
    """
    from dho_pipeline.cache_reader import CacheReader
    from dho_pipeline.manifest import load_manifest
    from dho_pipeline.package_data import IMAGENET_TEMPLATES
    from dho_pipeline.prompts import read_classnames, read_templates
    from dho_pipeline.split import load_split

    from .common import class_list

    manifest = load_manifest(config.manifest)
    split = load_split(config.split)
    if config.teacher_online:
        classnames, source = class_list(config.classnames, manifest)
        templates = read_templates(config.templates or IMAGENET_TEMPLATES)
        split.check_manifest(manifest, where=f"split {config.split}")
        reader = None
    else:
        # The CE-only baseline reads no teacher targets (it shows the same cached views), so any T will do.
        temperature = config.temperature if config.objective_spec().needs_teacher else None
        # The cache must hold the class names given, else those the manifest records (if any).
        classnames, source = (read_classnames(config.classnames), str(config.classnames)) if config.classnames is not None \
            else (manifest.classnames, "the manifest's class names (classes.txt beside its shards)")
        reader = CacheReader.open(config.cache, manifest, temperature, classnames=classnames, classnames_source=source)
        split.check_manifest(manifest, where=f"split {config.split}")
        classnames, templates = reader.spec.classnames, reader.spec.templates
        source = f"the class names of cache {config.cache}"
    manifest.check_files()
    # A cache's list was checked when it was built (cache-teacher): here only a warning, as for a file named.
    given = config.classnames is not None or reader is not None
    warning = manifest.check_class_count(len(classnames), source, given=given, allow_unused=config.allow_unused_classes)
    if warning:
        log.warning("warning: %s", warning)
    return manifest, reader, split, classnames, templates


def _samples(config, manifest, reader, split):
    """The labeled and unlabeled sample ids to train on, the table they index, and their counts.

    Samples stage one could not decode (--on-error skip) have no teacher targets: skipped and counted."""
    import numpy as np

    from dho_pipeline.student_data import SampleTable

    table = SampleTable.from_manifest(manifest)
    usable = ~np.concatenate(reader.missing_masks()) if reader else np.ones(len(table.shard), bool)
    labeled = table.ids_of(split.labeled_mask(manifest))
    unlabeled = table.ids_of(split.unlabeled_mask(manifest))
    counts = {"labeled": int(usable[labeled].sum()), "unlabeled": int(usable[unlabeled].sum()),
              "skipped_missing": int((~usable[labeled]).sum() + (~usable[unlabeled]).sum())}
    labeled, unlabeled = labeled[usable[labeled]], unlabeled[usable[unlabeled]]
    if len(labeled) == 0:
        raise UserError(f"split {config.split} has no labeled samples that the cache holds")
    return table, labeled, unlabeled, counts


def run(config: Config) -> dict:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    from dho_pipeline.checkpoints import complete_training_states, load_checkpoint_file, remove_partial_training_states
    from dho_pipeline.clip_models import load_clip
    from dho_pipeline.pixels import Normalizer
    from dho_pipeline.progress import progress
    from dho_pipeline.schedule import StepPlan, warmup_cosine
    from dho_pipeline.student import build_student
    from dho_pipeline.student_data import training_loaders

    from .common import process_state, resolve_compile, resolve_precision

    # ---- setup: inputs checked, run directory claimed --------------------------------------------
    manifest, reader, split, classnames, templates = _check_inputs(config)
    objective = config.objective_spec()
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
    student_preprocess = loaded.preprocess
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
    table, labeled_ids, unlabeled_ids, counts = _samples(config, manifest, reader, split)
    streams = training_loaders(
        table, labeled_ids, unlabeled_ids if objective.needs_teacher else None,
        image_size=student_preprocess.image_size, micro_batch=micro_batch, seed=config.seed,
        rank=accelerator.process_index, world=accelerator.num_processes, positions=positions, workers=config.workers,
        reader=reader, online_views=teacher.views if teacher else None,
        teacher_size=teacher.image_size if teacher else None, pin_memory=device.type == "cuda",
    )
    plan = StepPlan.of(num_unlabeled=counts["unlabeled"], batch_size=config.batch_size, epochs=config.epochs)
    last_step = plan.total_steps if config.max_steps is None else min(plan.total_steps, config.max_steps)
    evaluation = _evaluator(config, accelerator, student, normalize, student_preprocess.image_size, classnames)
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
    window = MetricsWindow()
    last_eval = None
    bar = progress(total=last_step, initial=step, unit="step", desc="train", show=accelerator.is_main_process)
    with bar:  # closed (and its line ended) on the way out, errors included
        while step < last_step:
            lr = warmup_cosine(step, base_lr=config.lr, warmup_steps=config.warmup_steps, total_steps=plan.total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            student.train()
            for micro in range(config.grad_accum):
                fetch_started = time.perf_counter()
                batches = {name: next(iterator) for name, iterator in iterators.items()}
                window.data_seconds += time.perf_counter() - fetch_started
                for name in positions:
                    positions[name] += name in batches
                if teacher is not None:
                    for batch in batches.values():
                        batch["teacher"] = teacher.targets(batch, config.temperature)
                sync = micro == config.grad_accum - 1
                with (nullcontext() if sync else accelerator.no_sync(student)), accelerator.autocast():
                    losses = _losses(objective, train_forward, batches, normalize)
                    loss = sum(losses.values()) / config.grad_accum
                accelerator.backward(loss)
                window.add(losses, 1 / config.grad_accum)
                window.samples += sum(len(b["labels"]) for b in batches.values()) * accelerator.num_processes
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            epoch = plan.epoch_of(step)
            bar.update(1)

            # ---- log ----
            window.steps += 1
            if step % config.log_every == 0 or step == last_step:
                record = window.record(step, epoch, lr)
                if accelerator.is_main_process:
                    append_jsonl(metrics_path, record)
                    bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k.startswith(("loss", "ce_", "kd_", "lr"))}
                                    | {"img/s": f"{record['samples_per_second']:.0f}"})
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)

            # ---- evaluate and checkpoint, at epoch ends (and every checkpoint_every steps) ----
            epoch_end = step % plan.steps_per_epoch == 0
            if epoch_end and evaluation is not None:
                last_eval = evaluation()
                if accelerator.is_main_process:
                    append_jsonl(metrics_path, {"step": step, "epoch": epoch, "eval": last_eval})
                accelerator.log({f"eval/{k}": v for k, v in last_eval.items()}, step=step)
            if epoch_end or step == last_step or (config.checkpoint_every and step % config.checkpoint_every == 0):
                _save_training_state(accelerator, out, config, student, optimizer, step, positions, epoch)

    # ---- the released checkpoint ------------------------------------------------------------------
    finished = step >= plan.total_steps
    epoch = plan.epoch_of(step)
    summary = {"steps": step, "total_steps": plan.total_steps, "finished": finished, "epoch": epoch,
               "eval": last_eval, **counts}
    if accelerator.is_main_process:
        _student_checkpoint(config, accelerator.unwrap_model(student), student_preprocess, classnames, templates,
                            reader, manifest, split, table, labeled_ids, step, finished, epoch, last_eval
                            ).save(out / "student.pt")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    append_jsonl(out / "ranks.jsonl", {"rank": accelerator.process_index, "steps": step, "positions": positions})
    accelerator.wait_for_everyone()
    accelerator.end_training()  # closes the trackers and the process group
    return summary


def _losses(objective, student, batches: dict, normalize) -> dict:
    """The objective's loss parts for one micro-batch; labeled and unlabeled go through one forward."""
    import torch

    labeled, unlabeled = batches["labeled"], batches.get("unlabeled")
    parts = [labeled] + ([unlabeled] if unlabeled is not None else [])
    ce_logits, kd_logits = student(torch.cat([normalize(b["pixels"]) for b in parts]))
    return objective.losses(ce_logits, kd_logits, labeled["labels"], labeled.get("teacher"),
                            unlabeled.get("teacher") if unlabeled is not None else None)


def _save_training_state(accelerator, out, config, student, optimizer, step, positions, epoch) -> None:
    from dho_pipeline.checkpoints import save_training_state

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        payload = {"model": accelerator.unwrap_model(student).state_dict(), "optimizer": optimizer.state_dict(),
                   "step": step, "positions": dict(positions), "epoch": epoch}
        save_training_state(out, step, payload, keep=config.keep_checkpoints)
    accelerator.wait_for_everyone()


def _student_checkpoint(config, student, preprocess, classnames, templates, reader, manifest, split, table,
                        labeled_ids, step, finished, epoch, last_eval):
    """student.pt: the released format, with what this run was (architecture, data, fingerprints)."""
    from dho_pipeline.hashing import fingerprint_json
    from dho_pipeline.student_checkpoint import PAPER_ALPHA_BETA, StudentCheckpoint, StudentMetadata

    metadata = StudentMetadata(
        model=config.student, pretrained=config.pretrained, preprocess=preprocess, classnames=list(classnames),
        templates=list(templates), config=config.to_json(),
        cache_fingerprint=fingerprint_json(reader.spec.to_attrs()) if reader else None,
        manifest_fingerprint=manifest.fingerprint, split_fingerprint=split.fingerprint, steps=step, finished=finished,
        labeled_keys=sorted(table.key(int(i)) for i in labeled_ids),
    )
    alpha, beta = PAPER_ALPHA_BETA
    return StudentCheckpoint(state_dict=student.state_dict(), epoch=epoch, acc=last_eval["mix"] if last_eval else None,
                             alpha=alpha, beta=beta, metadata=metadata)


def _online_teacher(config: Config, classnames, templates, device, precision, compiled, batch_size):
    """--teacher-online: the zero-shot teacher, built and run exactly as cache-teacher runs it."""
    from dho_pipeline.teacher import OnlineTeacher, load_zero_shot_teacher

    from .common import precision_dtype

    loaded = load_zero_shot_teacher(config.teacher, config.teacher_pretrained, classnames, templates, device=device,
                                    dtype=precision_dtype(precision), compile=compiled, batch_size=batch_size)
    return OnlineTeacher(loaded, seed=config.seed, crop_scale=config.crop_scale, device=device)


def _evaluator(config: Config, accelerator, student, normalize, student_size, classnames):
    """A function that evaluates each head and the alpha = beta = 0.5 mix on --eval-data (each sample once
    across ranks), or None."""
    if config.eval_data is None:
        return None
    import numpy as np

    from dho_pipeline.evaluation import finish_statistics, logits_on_samples, sufficient_statistics
    from dho_pipeline.manifest import load_manifest
    from dho_pipeline.student_data import SampleTable

    eval_manifest = load_manifest(config.eval_data)
    eval_manifest.check_files()
    eval_manifest.check_labels(len(classnames), required=True)
    table = SampleTable.from_manifest(eval_manifest)

    def evaluate() -> dict:
        logits = logits_on_samples(
            student, table, np.arange(len(table.label)), student_size, normalize, rank=accelerator.process_index,
            world=accelerator.num_processes, batch_size=config.eval_batch_size, workers=config.workers,
            autocast=accelerator.autocast,
        )
        stats = reduce_sum(accelerator.state, sufficient_statistics(logits, 0.5, 0.5, len(classnames)))
        report = finish_statistics(stats, len(classnames))
        return {head: report[head]["top1"] for head in ("ce", "kd", "mix")} | {"samples": report["samples"]}

    return evaluate
