"""gpu_check's teacher sections: the environment, the teacher model alone (section 1), its compile (section 4).

Each function takes gpu_check's `Run` (settings, the log, the time caps, `run.fig` for the section's
JSON, `run.shared` for what later sections need). See bench/gpu_check.py for how to run them.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import shutil
import time
import warnings
from contextlib import nullcontext

import torch
from common import analytic_vit_flops
from gpu_run import CapExceeded, error_text, free_memory

PEAK_BF16_DENSE = [  # (substring of the device name, datasheet dense bf16 FLOP/s), most specific first
    ("GH200", 989.4e12), ("H200", 989.4e12), ("H100 PCIe", 756.5e12), ("H100 NVL", 835.0e12), ("H100", 989.4e12),
    ("A100", 312.0e12),
]
PACKAGES = ("open_clip", "webdataset", "zarr", "numcodecs", "timm", "accelerate", "huggingface_hub", "ftfy", "regex",
            "wcwidth", "braceexpand", "donfig", "safetensors", "tqdm", "PIL", "numpy", "triton", "torchvision", "click")


# ---- environment ---------------------------------------------------------------------------------


def environment(run) -> dict:
    env = {"args": vars(run.args), "settings": run.cfg, "python": platform.python_version(),
           "cpu_count": os.cpu_count(), "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
           "pythonpath": os.environ.get("PYTHONPATH"), "packages": package_versions(),
           "c_compiler": shutil.which("cc") or shutil.which("gcc")}
    if torch.cuda.is_available():
        env.update(device_name=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                   memory_gb=torch.cuda.get_device_properties(0).total_memory / 2**30, cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
        env["peak_bf16_flops"] = run.shared["peak"] = next(
            (peak for key, peak in PEAK_BF16_DENSE if key in env["device_name"]), None)
        env["measured_bf16_matmul_flops"] = run.shared["measured_peak"] = matmul_flops()
        run.say(f"bf16 8192^3 matmul: {env['measured_bf16_matmul_flops'] / 1e12:.0f} TFLOP/s")
    missing = [name for name, version in env["packages"].items() if version.startswith("MISSING")]
    run.say(f"device: {env.get('device_name', 'cpu')}; torch {torch.__version__}; missing: {missing or 'nothing'}")
    return env


def package_versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                versions[name] = str(getattr(__import__(name), "__version__", "present"))
        except Exception as error:  # noqa: BLE001 - ImportError, or a broken install
            versions[name] = f"MISSING ({type(error).__name__}: {error})"
    return versions


def matmul_flops(size: int = 8192, reps: int = 10) -> float:
    """What a plain bf16 matrix product reaches on this card (MFU is also given against it)."""
    a, b = (torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * reps / (time.perf_counter() - started)


# ---- timing ----------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(call, device, target_seconds: float, warmup: int = 2, min_iters: int = 3, max_iters: int = 60):
    """Seconds per call (after warm-up), with as many calls as fit in about target_seconds. The GPU's
    peak-memory counter restarts here, so a variant's peak_memory_gb is its own."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        call()
    synchronize(device)
    started = time.perf_counter()
    call()
    synchronize(device)
    iters = int(min(max_iters, max(min_iters, math.ceil(target_seconds / max(time.perf_counter() - started, 1e-6)))))
    started = time.perf_counter()
    for _ in range(iters):
        call()
    synchronize(device)
    return (time.perf_counter() - started) / iters, iters


class Variants:
    """Images/s of teacher variants per batch size, kept in run.fig["variants"], with MFU and the best."""

    def __init__(self, run, device, image_size, flops_per_image):
        self.run, self.device, self.image_size, self.flops = run, device, image_size, flops_per_image
        self.table = run.fig.setdefault("variants", {})

    def input(self, batch: int, channels_last: bool = False, dtype=torch.float32) -> torch.Tensor:
        x = torch.randn(batch, 3, *self.image_size, device=self.device)
        return (x.contiguous(memory_format=torch.channels_last) if channels_last else x).to(dtype)

    def measure(self, name, model, batches, *, channels_last=False, bf16_weights=False, autocast=True) -> None:
        for batch in batches:
            try:
                x = self.input(batch, channels_last, torch.bfloat16 if bf16_weights else torch.float32)
                context = torch.autocast(self.device.type, dtype=torch.bfloat16) if autocast else nullcontext()
                with torch.inference_mode(), context:
                    seconds, iters = timed(lambda: model(x), self.device, self.run.cfg["measure_seconds"])
                self.record(name, batch, seconds, iters=iters)
            except Exception as error:  # noqa: BLE001 - an OOM at one batch size leaves the others
                self.table.setdefault(name, {})[str(batch)] = {"error": str(error)[:500]}
                self.run.say(f"  {name} batch {batch}: FAILED {str(error)[:200]}")
            finally:
                x = None
                free_memory()

    def record(self, name: str, batch: int, seconds: float, **extra) -> float:
        ips, peak = batch / seconds, self.run.shared.get("peak")
        entry = {"images_per_second": ips, "seconds_per_batch": seconds,
                 "mfu": ips * self.flops / peak if peak else None, **extra}
        if self.device.type == "cuda":
            entry["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.table.setdefault(name, {})[str(batch)] = entry
        self.run.say(f"  {name:28s} batch {batch:4d}: {ips:8.1f} img/s" + (f", MFU {entry['mfu']:.1%}" if peak else ""))
        best = self.best(list(self.table))  # kept current: a cap mid-section still leaves a headline
        self.run.fig["best"] = self.run.headline["teacher_model"] = {
            "variant": best[0], "batch": best[1], "images_per_second": best[2],
            "mfu": best[2] * self.flops / peak if peak else None}
        self.run.save("teacher_model", self.run.fig)
        return ips

    def best(self, names) -> tuple | None:
        found = [(name, int(batch), entry["images_per_second"]) for name in names
                 for batch, entry in self.table.get(name, {}).items() if entry.get("images_per_second")]
        return max(found, key=lambda item: item[2]) if found else None

    def rate(self, name: str, batch: int) -> float | None:
        return self.table.get(name, {}).get(str(batch), {}).get("images_per_second")


# ---- section 1: the teacher, model only ------------------------------------------------------------


def build_teacher(run, device):
    """The teacher's image tower (random weights) behind ZeroShotTeacher with a random 1000-class classifier."""
    from dho_pipeline.clip_models import load_clip
    from dho_pipeline.teacher import ZeroShotTeacher

    started = time.perf_counter()
    loaded = load_clip(run.cfg["teacher"], "none")
    classifier = torch.randn(1000, loaded.model.visual.output_dim, generator=torch.Generator().manual_seed(0))
    teacher = ZeroShotTeacher(loaded.model.visual, classifier).to(device).eval()
    run.fig.update(teacher=run.cfg["teacher"], build_seconds=time.perf_counter() - started,
                   image_size=list(loaded.preprocess.image_size),
                   parameters_visual_m=sum(p.numel() for p in teacher.visual.parameters()) / 1e6)
    run.say(f"teacher {run.cfg['teacher']} built in {run.fig['build_seconds']:.1f}s, "
            f"{run.fig['parameters_visual_m']:.0f}M parameters, input {loaded.preprocess.image_size}")
    return teacher, loaded.preprocess


def count_flops(run, teacher, device, image_size) -> int:
    """FLOPs per image with torch's FLOP counter (fp32 weights under autocast: the attention runs
    through F.scaled_dot_product_attention, which the counter sees), checked against the analytic count."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16), FlopCounterMode(display=False) as counter:
        teacher(torch.randn(1, 3, *image_size, device=device))
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    analytic = analytic_vit_flops(teacher.visual, 1000)
    used = counter.get_total_flops() if any("attention" in op for op in by_op) else analytic
    run.fig["flops_per_image"] = {"flop_counter": counter.get_total_flops(), "by_op": by_op, "analytic": analytic,
                                  "used": used, "note": "multiply-add = 2 FLOPs; one image, inference under bf16 autocast"}
    run.shared["flops_per_image"] = used
    run.say(f"FLOPs/image: counter {counter.get_total_flops() / 1e12:.3f} T, analytic {analytic / 1e12:.3f} T")
    return used


def kernel_kind(name: str) -> str:
    low = name.lower()
    kinds = [("attention", ("flash", "fmha", "attention", "attn", "sdpa")),
             ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "sm90_", "sm80_", "wgmma", "addmm", "bmm", "matmul")),
             ("layernorm", ("layer_norm", "layernorm")), ("copy/transpose", ("copy", "transpose", "memcpy", "cat_")),
             ("elementwise", ("elementwise", "vectorized", "unrolled", "aten::mul", "aten::add", "aten::sigmoid")),
             ("reduction", ("reduce", "softmax")), ("conv", ("conv",))]
    return next((kind for kind, words in kinds if any(w in low for w in words)), "other")


def profile(call, device) -> dict:
    """Share of kernel time by kind (matrix products, attention, element-wise, ...) for one call."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    cuda = device.type == "cuda"
    with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        call()
        synchronize(device)
    events = prof.key_averages()
    if cuda:  # kernels only: aten ops carry their kernels' time too
        timed_events = [(e.key, e.self_device_time_total) for e in events
                        if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0]
    else:
        timed_events = [(e.key, e.self_cpu_time_total) for e in events if e.key.startswith("aten::") and e.self_cpu_time_total > 0]
    total = sum(t for _, t in timed_events) or 1
    shares: dict = {}
    for key, t in timed_events:
        shares[kernel_kind(key)] = shares.get(kernel_kind(key), 0) + t / total
    top = sorted(timed_events, key=lambda kt: -kt[1])[:12]
    return {"time_share_by_kind": dict(sorted(shares.items(), key=lambda kv: -kv[1])), "total_ms": total / 1000,
            "top": [{"name": k[:140], "ms": t / 1000, "share": t / total} for k, t in top]}


def measure_runner(run, variants, teacher, teacher_bf16, batch):
    """The stage's default: dho_pipeline's TeacherRunner (bf16 weights, compiled, padded batches); how
    far its logits are from the fp32 tower's (no autocast)."""
    from dho_pipeline.teacher import TeacherRunner

    run.say(f"section 1: TeacherRunner(bf16, compiled) at batch {batch} (compiles first)")
    try:
        runner = TeacherRunner(teacher_bf16, dtype=torch.bfloat16, compile=True, batch_size=batch)
        x = variants.input(batch)
        started = time.perf_counter()
        with run.cap(min(run.args.compile_cap, run.remaining() - 5), "TeacherRunner compile"):
            runner(x)
            synchronize(variants.device)
        compile_seconds = time.perf_counter() - started
        with torch.no_grad():  # as the stage calls it: inference mode would compile a second graph
            run.fig["runner_max_abs_logit_diff_vs_fp32"] = (runner(x)[:8] - teacher(x[:8]).float()).abs().max().item()
        seconds, iters = timed(lambda: runner(x), variants.device, run.cfg["measure_seconds"])
        variants.record("runner_bf16_compiled", batch, seconds, iters=iters, compile_seconds=compile_seconds)
        return runner
    except (Exception, CapExceeded) as error:  # noqa: BLE001 - the eager bf16 tower stands in
        variants.table["runner_bf16_compiled"] = {str(batch): {"error": error_text(error)}}
        run.say(f"  runner FAILED: {str(error)[:200]}")
        return None


def measure_stage_path(run, variants, model, preprocess, batch) -> None:
    """cache-teacher's per-batch path: uint8 pinned -> Normalizer -> teacher -> top-k -> .cpu()."""
    from dho_pipeline.pixels import Normalizer
    from dho_pipeline.teacher import summarize_logits

    normalize = Normalizer(preprocess.mean, preprocess.std, variants.device)
    pixels = torch.randint(0, 256, (batch, *preprocess.image_size, 3), dtype=torch.uint8)
    pixels = pixels.pin_memory() if variants.device.type == "cuda" else pixels

    def step():
        indices, values, log_partition = summarize_logits(model(normalize(pixels)), 100, [1.0, 2.0])
        return indices.cpu(), values.cpu(), log_partition.cpu()

    with torch.no_grad():  # as the stage runs it (the model may be the compiled runner)
        seconds, iters = timed(step, variants.device, run.cfg["measure_seconds"])
    variants.record("stage_path", batch, seconds, iters=iters)


def sdpa_block_teacher(run, teacher, device):
    """The same teacher with open_clip's own attention block (vision `block_type: custom`, which calls
    F.scaled_dot_product_attention), built from a model-config file through the library's loader
    (the way `--teacher config.json` works) and given the same weights."""
    import open_clip

    from dho_pipeline.clip_models import load_clip, resolve_model_name
    from dho_pipeline.teacher import ZeroShotTeacher

    config = open_clip.get_model_config(resolve_model_name(run.cfg["teacher"]))
    config = {**config, "vision_cfg": {**config["vision_cfg"], "block_type": "custom"}}
    path = run.work / "teacher-sdpa-block.json"
    path.write_text(json.dumps(config))
    visual = load_clip(str(path), "none").model.visual
    visual.load_state_dict(teacher.visual.state_dict(), strict=True)
    return ZeroShotTeacher(visual, teacher.class_embeddings).to(device).eval()


def measure_layouts(run, variants, teacher, teacher_bf16, batch) -> None:
    run.say(f"section 1: channels-last input, open_clip's SDPA block, at batch {batch}")
    variants.measure("eager_autocast_channels_last", teacher, [batch], channels_last=True)
    variants.measure("eager_bf16_channels_last", teacher_bf16, [batch], channels_last=True, bf16_weights=True,
                     autocast=False)
    try:
        sdpa = sdpa_block_teacher(run, teacher, variants.device)
        probe = variants.input(2)
        with torch.inference_mode(), torch.autocast(variants.device.type, dtype=torch.bfloat16):
            run.fig["sdpa_block_max_abs_logit_diff"] = (sdpa(probe) - teacher(probe)).abs().max().item()
        variants.measure("sdpa_block_autocast", sdpa, [batch])
        sdpa.visual.to(torch.bfloat16)
        variants.measure("sdpa_block_bf16", sdpa, [batch], bf16_weights=True, autocast=False)
        run.shared["sdpa_teacher"] = sdpa
    except Exception as error:  # noqa: BLE001
        run.fig["sdpa_block_error"] = error_text(error)
        run.say(f"  SDPA block FAILED: {str(error)[:200]}")


def measure_profiles(run, variants, teacher, teacher_bf16, batch) -> None:
    with torch.inference_mode():
        with torch.autocast(variants.device.type, dtype=torch.bfloat16):
            run.fig["profile_autocast"] = profile(lambda: teacher(variants.input(batch)), variants.device)
        run.fig["profile_bf16"] = profile(lambda: teacher_bf16(variants.input(batch, dtype=torch.bfloat16)), variants.device)
    run.save("teacher_model", run.fig)


def section_teacher_model(run) -> None:
    from gpu_stages import wait_for_data

    device = torch.device(run.cfg["device"])
    teacher, preprocess = build_teacher(run, device)
    try:
        wait_for_data(run)  # the shards share the CPU: finish them before anything is timed
    except Exception as error:  # noqa: BLE001 - section 2 reports it; model-only figures do not need data
        run.fig["data_error"] = error_text(error)
    variants = Variants(run, device, preprocess.image_size, count_flops(run, teacher, device, preprocess.image_size))
    batches = run.cfg["batches"][-1:] if run.args.quick else run.cfg["batches"]
    batch, teacher_bf16 = batches[-1], copy.deepcopy(teacher)
    teacher_bf16.visual.to(torch.bfloat16)  # the classifier stays fp32, as ZeroShotTeacher expects
    try:  # a cap or an error mid-way still leaves the figures measured so far for sections 2 and 4
        run.say("section 1: fp32 weights + bf16 autocast; weights cast to bf16")
        variants.measure("eager_autocast", teacher, batches)
        variants.measure("eager_bf16", teacher_bf16, batches, bf16_weights=True, autocast=False)
        best = variants.best(["eager_bf16"]) or variants.best(["eager_autocast"])
        batch = run.fig["best_batch"] = run.shared["best_batch"] = best[1] if best else batch
        runner = measure_runner(run, variants, teacher, teacher_bf16, batch)
        measure_stage_path(run, variants, runner or teacher_bf16, preprocess, batch)
        if not run.args.quick:
            measure_layouts(run, variants, teacher, teacher_bf16, batch)
            measure_profiles(run, variants, teacher, teacher_bf16, batches[0])
    finally:
        chosen = next((name for name in ("runner_bf16_compiled", "eager_bf16") if variants.rate(name, batch)), None)
        run.fig["model_only_for_stage"] = run.shared["model_only"] = \
            {"variant": chosen, "batch": batch, "images_per_second": variants.rate(chosen, batch)} if chosen else None
        run.shared["stage_path_ips"] = variants.rate("stage_path", batch)
        keep_compile_candidate(run, variants, teacher, teacher_bf16)


def keep_compile_candidate(run, variants, teacher, teacher_bf16) -> None:
    """The best eager variant, moved to the CPU for section 4 (which compiles it)."""
    models = {"eager_autocast": (teacher, False, False, True), "eager_autocast_channels_last": (teacher, True, False, True),
              "eager_bf16": (teacher_bf16, False, True, False), "eager_bf16_channels_last": (teacher_bf16, True, True, False),
              "sdpa_block_bf16": (run.shared.get("sdpa_teacher"), False, True, False)}
    best = variants.best([name for name in models if models[name][0] is not None])
    if best:
        model, channels_last, bf16_weights, autocast = models[best[0]]
        run.shared["compile_candidate"] = dict(variant=best[0], batch=best[1], eager_ips=best[2], model=model.to("cpu"),
                                               channels_last=channels_last, bf16_weights=bf16_weights,
                                               autocast=autocast, image_size=variants.image_size)
    run.shared.pop("sdpa_teacher", None)


# ---- section 4: torch.compile of the best eager variant ---------------------------------------------


def section_teacher_compile(run) -> None:
    candidate = run.shared.get("compile_candidate")
    if not candidate:
        raise RuntimeError("no eager variant from section 1 to compile")
    device = torch.device(run.cfg["device"])
    variants = Variants(run, device, candidate["image_size"], run.shared["flops_per_image"])
    model, batch = candidate["model"].to(device), candidate["batch"]
    run.fig.update(variant=candidate["variant"], batch=batch, eager_images_per_second=candidate["eager_ips"],
                   backend=run.cfg["compile_backend"])
    x = variants.input(batch, candidate["channels_last"], torch.bfloat16 if candidate["bf16_weights"] else torch.float32)
    context = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if candidate["autocast"] else nullcontext
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=run.cfg["compile_backend"])
    run.say(f"section 4: torch.compile({candidate['variant']}, backend={run.cfg['compile_backend']}) at batch {batch}")
    started = time.perf_counter()
    try:
        with run.cap(min(run.args.compile_cap, run.remaining() - 5), "torch.compile"), torch.inference_mode(), context():
            compiled(x)
            synchronize(device)
    except CapExceeded as error:
        run.fig.update(status="skipped", reason=str(error))
        return
    run.fig["compile_seconds"] = time.perf_counter() - started
    with torch.inference_mode(), context():
        seconds, iters = timed(lambda: compiled(x), device, run.cfg["measure_seconds"])
    ips = batch / seconds
    peak = run.shared.get("peak")
    run.fig.update(status="ok", images_per_second=ips, iters=iters, speedup_over_eager=ips / candidate["eager_ips"],
                   mfu=ips * run.shared["flops_per_image"] / peak if peak else None)
    run.headline["teacher_compile"] = {k: run.fig.get(k) for k in ("variant", "batch", "images_per_second", "mfu",
                                                                   "compile_seconds", "speedup_over_eager")}
    run.say(f"  compiled: {ips:.1f} img/s, {ips / candidate['eager_ips']:.2f}x eager")
