"""Stage two: train a dual-head student against a teacher cache (DHO, arXiv 2505.07675).

    dho-pipeline train --cache C.zarr --manifest M.json --split S.json --out runs/b16-1pct
    torchrun --nproc_per_node 8 --no-python dho-pipeline train --config vit-b16-1pct ...

The student is a CLIP image tower or any timm model (`--student timm:NAME`, dho_pipeline.backbones) with
`--head cosine` or `linear` heads (dho_pipeline.student). The teacher is never loaded: its outputs come
from the cache, per view. Each optimiser step takes
`batch_size` labeled and `batch_size` unlabeled samples (global, over all processes and accumulation
micro-steps); an epoch is one pass over the unlabeled set, the labeled stream cycles. The losses are
the library's (dho_pipeline.objectives): for DHO, CE(ce_head(x_l), y) + KD(kd_head(x_l)) + KD(kd_head(x_u)).
The learning rate follows dho_pipeline.schedule (`--lr-schedule`). Every setting in which the DHO
reference implementation differs from ours has a switch whose value `reference` reproduces it (lr
schedule, steps per epoch, views shown, student resampling, evaluation view; docs/fidelity.md); the
paper's recipes select them all.

Outputs in RUN_DIR: `config.json` (resolved), `metrics.jsonl`, `tensorboard/` (or the --report-to
trackers'), `checkpoints/step-N/` (resumable state, written whole or not at all), and `student.pt` in
the released checkpoint format.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from dho_pipeline.cache_store import CLASS_EMBEDDINGS
from dho_pipeline.errors import Stopped, UserError
from dho_pipeline.schedule import EPOCH_STEPS, LR_SCHEDULES
from dho_pipeline.split import RULES as SPLIT_RULES
from dho_pipeline.views import TRAIN_RESIZES

from . import train_setup as setup
from .common import MetricsWindow, append_jsonl, log, reduce_sum
from .options import FloatList, check_choices, read_recipe, setting
from .shared_settings import device_setting, eval_view_setting, precision_setting, verify_shards_setting
from .trackers import CHOICES as TRACKER_CHOICES

OBJECTIVES = ("dho", "single-head", "ce", "kd")
TRAIN_VIEWS = ("all", "crops")


@dataclass(frozen=True, kw_only=True)
class Config:
    cache: Path | None = setting(None, help="Teacher cache (from cache-teacher); not needed with --teacher-online.")
    manifest: Path = setting(help="Manifest the cache was built from.")
    split: Path = setting(help="Label split (from split).")
    out: Path = setting(help="Run directory.")
    student: str = setting("ViT-B-16-quickgelu", help="open_clip model name or model-config JSON, or timm:NAME "
                           "(any timm model, e.g. timm:resnet18).")
    pretrained: str | None = setting(None, default_text="openai; for timm:NAME, timm's default tag",
                                     help="open_clip or timm tag, local weights file, or 'none'.")
    head: str | None = setting(None, choices=("cosine", "linear"), default_text="cosine; for timm:NAME, linear",
                               help="Heads: cosine (kd_head(normalize(f)) * 100, ImageNet) or linear (few-shot).")
    eval_crop: float | None = setting(None, default_text="the student's own (timm's crop_pct; 1 for CLIP)",
                                      help="Evaluation view: centred square of this share of the shorter side.")
    objective: str = setting("dho", choices=OBJECTIVES, help="What the student learns from (dho_pipeline.objectives).")
    tail: str = setting("bucket", choices=("bucket", "uniform"), help="Teacher mass outside the cached top-k.")
    temperature: float = setting(2.0, help="KD temperature; the cache must hold it (or every logit).")
    loss_weights: tuple[float, float, float] = setting(
        (1.0, 1.0, 1.0), help="Weights of CE on labeled, KD on labeled, KD on unlabeled.")
    epochs: int = setting(32, help="Passes over the unlabeled set.")
    batch_size: int = setting(256, help="Labeled (and as many unlabeled) samples per optimiser step, global.")
    lr: float = setting(5e-5, help="Peak learning rate (AdamW).")
    weight_decay: float = setting(0.05, help="AdamW weight decay.")
    warmup_steps: int = setting(5000, help="Linear warm-up steps (warmup-cosine caps them at a tenth of the run).")
    lr_schedule: str = setting(
        "warmup-cosine", choices=LR_SCHEDULES,
        help="Warm-up from 0 then cosine to 0; or 'reference': LinearLR from 0.01 times a cosine of period total - "
             "warm-up, multiplied from step 0 (it rises again over the last warm-up steps).")
    epoch_steps: str = setting(
        "floor", choices=EPOCH_STEPS,
        help="Steps per epoch: whole global batches of the unlabeled set; or 'reference': ceil over each process's "
             "padded share, as a DistributedSampler loader counts them.")
    train_views: str = setting(
        "all", choices=TRAIN_VIEWS,
        help="Cached views a sample shows: all; or 'crops': never view 0 (the whole image; the reference trains "
             "on random crops only). 'crops' needs 2+ cached views.")
    train_resize: str = setting(
        "direct", choices=TRAIN_RESIZES,
        help="Student training views: crop -> student size, one bicubic resize; or 'reference': crop -> teacher size "
             "-> student size, two.")
    eval_view: str = eval_view_setting("View of the eval-data images")
    split_rule: str | None = setting(
        None, choices=(*SPLIT_RULES, "list"), default_text="any",
        help="Refuse a split drawn by another rule (the paper's recipes ask for 'reference').")
    teacher_class_embeddings: str | None = setting(
        None, choices=CLASS_EMBEDDINGS, default_text="the cache's; online: unit",
        help="With a cache: refuse unless it was built with these class embeddings. Online: the teacher's.")
    precision: str | None = precision_setting("Autocast precision of the training step.")
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
    report_to: str = setting("tensorboard", choices=TRACKER_CHOICES,
                             help="Experiment tracker(s), through Accelerate (W&B offline, MLflow to RUN/mlruns by default).")
    max_steps: int | None = setting(None, help="Stop after this many steps (the schedule still spans all epochs).")
    device: str | None = device_setting()
    classnames: Path | None = setting(
        None, default_text="the manifest's (classes.txt beside its shards), else with a cache the cache's, online ImageNet's",
        help="With a cache: refuse unless it was built for these class names. Online: the classes.")
    allow_unused_classes: bool = setting(False, help="Online: accept a class list longer than the labels imply (a "
                                         "cache's list was checked by cache-teacher: a warning only).")
    templates: Path | None = setting(None, default_text="the paper's 7 ImageNet templates",
                                     help="Online teacher: prompt templates, one per line with {}.")
    teacher_online: bool = setting(False, help="Run the teacher on each view in the loop (the reference's way), no cache.")
    teacher: str | None = setting(None, help="Online teacher: open_clip model name or config JSON.")
    teacher_pretrained: str | None = setting(None, help="Online teacher: open_clip tag, weights file or 'none'.")
    crop_scale: tuple[float, float] = setting((0.5, 1.0), type=FloatList(),
                                              help="Online teacher: RandomResizedCrop area range of the views.")
    verify_shards: str = verify_shards_setting()

    def __post_init__(self):
        from dho_pipeline.backbones import StudentSpec, default_head, default_pretrained

        # Defaults that depend on the student's family are resolved here, so config.json records them.
        if self.pretrained is None:
            object.__setattr__(self, "pretrained", default_pretrained(self.student))
        if self.head is None:
            object.__setattr__(self, "head", default_head(StudentSpec.parse(self.student).family))
        check_choices(self)  # recipes and the Python API bypass click's own check
        if self.eval_crop is not None and not 0 < self.eval_crop <= 1:
            raise UserError(f"--eval-crop must lie in (0, 1], not {self.eval_crop}")
        if self.temperature <= 0 or self.lr <= 0 or self.epochs < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise UserError("--temperature, --lr, --epochs, --batch-size and --grad-accum must be positive")
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
_TRAJECTORY = ("student", "pretrained", "head", "objective", "tail", "temperature", "loss_weights", "epochs",
               "batch_size", "lr", "weight_decay", "warmup_steps", "grad_accum", "seed", "teacher_online",
               "teacher", "teacher_pretrained", "crop_scale", "lr_schedule", "epoch_steps", "train_views",
               "train_resize", "teacher_class_embeddings")


def load_recipe(path: Path) -> dict:
    """A recipe: a TOML file of Config fields (paths relative to the working directory), given as a path or
    as the name of a recipe that ships with the package (`vit-b16-1pct`, see manifests/recipes/)."""
    from dho_pipeline.package_data import RECIPES

    return read_recipe(path, Config, RECIPES)


def run(config: Config) -> dict:
    with ExitStack() as held:  # holds the run directory's lock until the run ends
        return _train(config, held)


def _train(config: Config, held: ExitStack) -> dict:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    from dho_pipeline import run_directory
    from dho_pipeline.checkpoints import complete_training_states, remove_partial_training_states
    from dho_pipeline.evaluation import epoch_evaluator
    from dho_pipeline.finite_guard import FiniteGuard
    from dho_pipeline.jsonfiles import write_text_atomically
    from dho_pipeline.pixels import Normalizer
    from dho_pipeline.processes import StopSignals, StopVote
    from dho_pipeline.progress import progress
    from dho_pipeline.schedule import StepPlan, learning_rate
    from dho_pipeline.student_data import training_loaders, training_samples

    from .common import on_main_then_share, process_state, resolve_compile, resolve_precision
    from .trackers import chosen_trackers, hparams, init_kwargs

    # ---- setup: inputs checked, run directory claimed (a second run in it is refused) and checked ----
    state = process_state(config.device)
    manifest, reader, split, classnames, templates = setup.check_inputs(config)
    trackers = chosen_trackers(config.report_to)
    started = time.time() - setup.earlier_seconds(config)
    objective = config.objective_spec()
    table, labeled_ids, unlabeled_ids, counts = training_samples(  # streams too small for the batch: refused
        manifest, split, reader, batch_size=config.batch_size, world=state.num_processes,
        needs_unlabeled=objective.needs_teacher, where=f"split {config.split}", warn=state.is_main_process)
    inputs = run_directory.input_fingerprints(manifest, split, reader, vars(config))
    out = Path(config.out)
    precision = resolve_precision(config.precision, state.device)
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    on_main_then_share(state, lambda: held.enter_context(run_directory.locked(out)))
    saved = complete_training_states(out)
    run_directory.check_continuation(out, resume=config.resume, has_checkpoints=bool(saved), settings=config.to_json(),
                                     trajectory=_TRAJECTORY, inputs=inputs)
    state.wait_for_everyone()
    # Only DHO uses both heads; the baselines leave one idle, which DDP must be told about.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=config.objective != "dho")
    accelerator = Accelerator(
        cpu=state.device.type == "cpu", mixed_precision=mixed, kwargs_handlers=[ddp],
        log_with=trackers or None, project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tensorboard")),
    )
    device = accelerator.device
    torch.manual_seed(config.seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        remove_partial_training_states(out)
        run_directory.record_start(out, config.to_json(), inputs)

    # ---- model and optimiser ----------------------------------------------------------------------
    student, student_spec, student_preprocess = setup.new_student(config, classnames, templates, device)
    normalize = Normalizer(student_preprocess.mean, student_preprocess.std, device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    # ---- resume: model, optimiser and data position from the newest complete checkpoint ------------
    step, positions = setup.restore(saved[-1], student, optimizer) if config.resume and saved else \
        (0, {"labeled": 0, "unlabeled": 0})
    if step and accelerator.is_main_process:
        log.info("resuming %s from step %d", out, step)
    student, optimizer = accelerator.prepare(student, optimizer)
    # The training forward is compiled; evaluation keeps the eager model (its batch sizes and
    # train/eval mode would each cost a recompile). DDP's hooks stay on the path: the compiled call
    # goes through the prepared module.
    compiled = resolve_compile(config.compile, device)
    train_forward = torch.compile(student, dynamic=False) if compiled else student

    # ---- data -------------------------------------------------------------------------------------
    micro_batch = setup.micro_batch(config, accelerator.num_processes)
    teacher = setup.online_teacher(config, classnames, templates, device, precision, compiled, micro_batch) \
        if config.teacher_online else None
    streams = training_loaders(
        table, labeled_ids, unlabeled_ids if objective.needs_teacher else None,
        image_size=student_preprocess.image_size, micro_batch=micro_batch, seed=config.seed,
        rank=accelerator.process_index, world=accelerator.num_processes, positions=positions, workers=config.workers,
        reader=reader, online_views=teacher.views if teacher else None,
        teacher_size=teacher.image_size if teacher else None, pin_memory=device.type == "cuda",
        via_size=setup.teacher_size(reader, teacher) if config.train_resize == "reference" else None,
        crops_only=config.train_views == "crops",
    )
    plan = StepPlan.of(num_unlabeled=counts["unlabeled"], batch_size=config.batch_size, epochs=config.epochs,
                       rounding=config.epoch_steps, world=accelerator.num_processes)

    def lr_at(step: int) -> float:
        return learning_rate(config.lr_schedule, step, base_lr=config.lr, warmup_steps=config.warmup_steps,
                             total_steps=plan.total_steps)

    lr_at(0)  # a schedule that cannot serve this run refuses now, before any step
    last_step = plan.total_steps if config.max_steps is None else min(plan.total_steps, config.max_steps)
    evaluation = epoch_evaluator(
        config.eval_data, student, normalize, student_preprocess, classnames, rank=accelerator.process_index,
        world=accelerator.num_processes, batch_size=config.eval_batch_size, workers=config.workers,
        autocast=accelerator.autocast, reduce_sum=lambda stats: reduce_sum(accelerator.state, stats),
        eval_view=config.eval_view,
    )
    if accelerator.is_main_process:
        log.info(
            "%d labeled + %d unlabeled samples (%d missing from the cache, skipped); %d steps per epoch, %d in all; "
            "%d + %d per step on each of %d process(es)",
            counts["labeled"], counts["unlabeled"], counts["skipped_missing"], plan.steps_per_epoch, plan.total_steps,
            micro_batch, micro_batch, accelerator.num_processes,
        )
        accelerator.init_trackers("dho", config=hparams(config.to_json()), init_kwargs=init_kwargs(trackers, out))

    # ---- the loop ---------------------------------------------------------------------------------
    iterators = {name: iter(loader) for name, loader in streams.items()}
    metrics_path = out / "metrics.jsonl"
    window = MetricsWindow()
    last_eval, stopping, saved_step = None, False, step
    # SIGTERM/SIGINT: every process finishes its step, one checkpoint is written, the run exits (errors.Stopped).
    signals = StopSignals()
    vote = StopVote(signals, accelerator.num_processes)
    # With fp16 loss scaling an infinite gradient is the scaler's business (it skips the step): loss only.
    guard = FiniteGuard(student.parameters(), num_processes=accelerator.num_processes,
                        gradients=accelerator.scaler is None)
    bar = progress(total=last_step, initial=step, unit="step", desc="train", show=accelerator.is_main_process)
    with bar, signals:  # the bar is closed (and its line ended) on the way out, errors included
        while step < last_step and not stopping:
            vote.post()
            lr = lr_at(step)
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
                guard.add(batches, loss)
            guard.end_step(step + 1)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            epoch = plan.epoch_of(step)
            bar.update(1)
            stopping = vote.stop()
            epoch_end = step % plan.steps_per_epoch == 0
            periodic = config.checkpoint_every and step % config.checkpoint_every == 0
            save = epoch_end or periodic or stopping or step == last_step

            # ---- check, then log ----
            window.steps += 1
            if save or step % config.log_every == 0:  # the host syncs here anyway
                guard.check(saved_step, report=out / "nonfinite.json", write_report=accelerator.is_main_process)
            if step % config.log_every == 0 or step == last_step:
                record = window.record(step, epoch, lr)
                if accelerator.is_main_process:
                    append_jsonl(metrics_path, record)
                    bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k.startswith(("loss", "ce_", "kd_", "lr"))}
                                    | {"img/s": f"{record['samples_per_second']:.0f}"})
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)

            # ---- evaluate and checkpoint, at epoch ends (and every checkpoint_every steps, or on a stop) ----
            if epoch_end and evaluation is not None and not stopping:
                last_eval = evaluation()
                if accelerator.is_main_process:
                    append_jsonl(metrics_path, {"step": step, "epoch": epoch, "eval": last_eval})
                accelerator.log({f"eval/{k}": v for k, v in last_eval.items()}, step=step)
            if save:
                setup.save_training_state(accelerator, out, config, student, optimizer, step, positions, epoch)
                saved_step = step
    if stopping and step < last_step:
        append_jsonl(out / "ranks.jsonl", {"rank": accelerator.process_index, "steps": step, "positions": positions,
                                           "stopped": signals.received or "by another process"})
        if accelerator.is_main_process:  # the time spent so far, which a --resume adds to its own
            write_text_atomically(out / "summary.json", json.dumps(
                {"steps": step, "total_steps": plan.total_steps, "finished": False, "stopped": True,
                 "wall_seconds": round(time.time() - started, 3)}, indent=2) + "\n")
        accelerator.end_training()
        raise Stopped(f"train stopped by {signals.received or 'a signal to another process'} after step {step}: "
                      f"checkpoint {out}/checkpoints/step-{step:08d} written; continue with the same command and --resume")

    # ---- the released checkpoint ------------------------------------------------------------------
    finished = step >= plan.total_steps
    epoch = plan.epoch_of(step)
    summary = {"steps": step, "total_steps": plan.total_steps, "finished": finished, "epoch": epoch,
               "eval": last_eval, **counts, "wall_seconds": round(time.time() - started, 3)}
    if accelerator.is_main_process:
        setup.student_checkpoint(config, accelerator.unwrap_model(student), student_spec, student_preprocess, classnames,
                                 templates, inputs, manifest, split, table, labeled_ids, step, finished, epoch, last_eval
                                 ).save(out / "student.pt")
        write_text_atomically(out / "summary.json", json.dumps(summary, indent=2) + "\n")
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
