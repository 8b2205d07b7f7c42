#!/usr/bin/env python3
"""GPU check (issue 7): teacher throughput and MFU, cache-teacher vs model-only, cached vs online training.

HOW TO RUN IT ON THE DEVICE MACHINE (one H100 or H200; repo root; the session first copies the wheels of
/work/shared/gpu/wheels into the ignored folder `.whl/` of the checkout):

    bash bench/gpu_check.sh

which is exactly

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site:$PWD \
      && PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT

Give the run tool timeout_s=600: the script stops itself after --budget seconds (default 450) and the
install takes ~10 s. Figures land as JSON in --out (default $OUT, else bench-out/gpu), flat, at most
6 files, each rewritten after every section (and inside sections), so a timeout still leaves figures:
    env.json            devices, versions, which imports are real or shimmed (regex, see below)
    teacher_model.json  section 1: ViT-H-14-378-quickgelu images/s per variant x batch, FLOPs, MFU
    cache_teacher.json  section 2: the real `cache-teacher` stage on generated JPEG shards
    train.json          section 3: ViT-B-16-quickgelu student steps, cached vs --teacher-online
    teacher_compile.json section 4: torch.compile of the best eager variant (compile capped at 90 s)
    summary.json        headline figures against the targets, per-section status/time, the progress log
Here, on a CPU, the same code paths with tiny models (about a minute or two):

    .venv/bin/python bench/gpu_check.py --toy

Sections (each runs under a time cap; an error or a cap is recorded in its JSON and the next one runs):
 1 teacher_model: the teacher (random weights, `load_clip(name, "none")`, image tower wrapped in
   `ZeroShotTeacher` with a random 1000-class classifier); FLOPs per image with FlopCounterMode; images/s
   for batches 64/128/256 as (a) fp32 weights + bf16 autocast (cache-teacher's first default), (b) weights
   cast to bf16; at the best batch (c) the library's TeacherRunner (bf16, compiled: the stage's default),
   channels-last input, open_clip's SDPA block (vision block_type "custom", same weights) and the stage's
   own per-batch path (uint8 pinned -> Normalizer -> runner -> top-k -> .cpu()). Which attention kernels run (profiler) and the GPU-time split by kernel kind.
 2 cache_teacher: 24 shards x 512 ImageNet-like JPEGs (500x375, generated in a process pool while section
   1 runs), manifest, then `stages.cache_teacher.run` (views 1, topk 100, workers 14, batch = section 1's
   best); images/s in steady state (from the teacher's own call times), end to end, and per shard
   read/compute/write seconds from `<cache>.timings.jsonl`; ratio to the model-only figure.
 3 train: split (10 %), then `stages.train.run` twice with the same student/data/batch (256+256, 128+128
   on OOM): against the cache, and --teacher-online; samples/s from metrics.jsonl after warm-up.
 4 teacher_compile: torch.compile (mode default) of section 1's best eager variant; skipped when
   compiling takes more than --compile-cap seconds.

open_clip's tokenizer imports `regex`, which has no wheel in /work/shared/gpu/wheels (the device image
had it on 2026-11-26); should it be missing, this script puts a small `re`-based stand-in in sys.modules
(translating the tokenizer's \\p{L}/\\p{N} classes) and says so in env.json. The dho-pipeline CLI itself
would fail with ModuleNotFoundError there.

Results of the runs on an H100 (2026-11-26) are in BENCHMARKS.md and bench/results/h100-2026-11-26/.
`--quick` (a rerun) measures section 1 at one batch size only, without profiles or layout/attention
variants; the stage default (`TeacherRunner`: bf16 weights, compiled) is always measured, and section 2's
ratio is taken against it.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import signal
import sys
import time
import traceback
import types
from contextlib import contextmanager, nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

T0 = time.perf_counter()
LOG: list[str] = []
OUT: Path = Path("bench-out/gpu")
DEADLINE = float("inf")
STATUS: dict = {}  # section -> {"status", "seconds", "error"}
HEADLINE: dict = {}  # figures for summary.json


# ---- small utilities -----------------------------------------------------------------------------


def say(message: str) -> None:
    line = f"[gpu_check {time.perf_counter() - T0:6.1f}s] {message}"
    LOG.append(line)
    print(line, flush=True)


def remaining() -> float:
    return DEADLINE - time.perf_counter()


def _clean(value):
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return None
        return round(value, 6)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return _clean(value.item())
        except Exception:
            return str(value)
    return value


def save(name: str, data: dict) -> None:
    """Write OUT/name.json atomically (the file count stays flat and small)."""
    OUT.mkdir(parents=True, exist_ok=True)
    payload = {"updated": time.strftime("%Y-%m-%dT%H:%M:%S"), "elapsed_s": round(time.perf_counter() - T0, 1),
               **_clean(data)}
    tmp = OUT / f".{name}.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(OUT / f"{name}.json")


def error_text(error: BaseException) -> str:
    lines = traceback.format_exception(type(error), error, error.__traceback__)
    text = "".join(lines)
    return text[-3000:]


def is_oom(error: BaseException) -> bool:
    return "out of memory" in str(error).lower() or type(error).__name__ == "OutOfMemoryError"


class CapExceeded(BaseException):
    """Raised by SIGALRM when a section or a compile runs past its cap (BaseException: nothing in the
    library or in torch._dynamo catches it as an ordinary error)."""


@contextmanager
def time_cap(seconds: float, what: str):
    if seconds <= 0:
        raise CapExceeded(f"{what}: no time left")

    def fire(signum, frame):
        raise CapExceeded(f"{what} ran past its cap of {seconds:.1f}s")

    # Nested caps: the inner one never outlives the outer one, which is re-armed afterwards.
    outer = signal.getitimer(signal.ITIMER_REAL)[0]
    started = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, min(seconds, outer) if outer > 0 else seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer > 0:
            signal.setitimer(signal.ITIMER_REAL, max(0.001, outer - (time.perf_counter() - started)))


def free_memory():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- regex: open_clip's tokenizer needs it; no wheel for it on the device machine -------------------

_TOKENIZER_CLASSES = [  # open_clip SimpleTokenizer's Unicode classes, longest first, in `re` syntax
    (r"[^\s\p{L}\p{N}]+", r"(?:[^\s\w]|_)+"),
    (r"[\p{L}]+", r"[^\W\d_]+"),
    (r"[\p{N}]", r"\d"),
]


def _translate(pattern):
    if isinstance(pattern, str):
        for unicode_class, stdlib in _TOKENIZER_CLASSES:
            pattern = pattern.replace(unicode_class, stdlib)
        if r"\p{" in pattern:
            raise re.error(f"regex stand-in cannot translate {pattern!r}")
    return pattern


def regex_standin() -> types.ModuleType:
    module = types.ModuleType("regex")
    for name in dir(re):
        if not name.startswith("_"):
            setattr(module, name, getattr(re, name))

    def wrap(function):
        def call(pattern, *args, **kwargs):
            return function(_translate(pattern), *args, **kwargs)
        return call

    for name in ("compile", "findall", "finditer", "match", "fullmatch", "search", "sub", "subn", "split"):
        setattr(module, name, wrap(getattr(re, name)))
    module.__version__ = "stdlib-re-standin"
    module.DHO_STANDIN = True
    return module


def setup_regex(mode: str) -> dict:
    """mode auto: the real `regex` if importable, else the stand-in; force: always the stand-in."""
    report: dict = {"mode": mode}
    real = None
    try:
        import regex as real  # noqa: F401

        report["real_regex"] = getattr(real, "__version__", "present")
    except ImportError:
        report["real_regex"] = None
    if real is not None and mode != "force":
        report["using"] = "regex"
        return report
    standin = regex_standin()
    sys.modules["regex"] = standin
    report["using"] = "stand-in (stdlib re, tokenizer classes translated)"
    if real is not None:  # compare the stand-in with the real thing on the tokenizer's pattern
        pattern = r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
        samples = ["a photo of a class123.", "itap of the great white shark's fin!", "<start_of_text>x y<end_of_text>",
                   "a_b -- c3po (x2)", "naive cafe, 42 rocks", "naïve café №5 ½"]
        compared = {}
        for text in samples:
            a = real.findall(real.compile(pattern, real.IGNORECASE), text.lower())
            b = standin.findall(standin.compile(pattern, standin.IGNORECASE), text.lower())
            compared[text] = "same" if a == b else {"regex": a, "standin": b}
        report["standin_vs_regex"] = compared
    return report


# ---- generated data --------------------------------------------------------------------------------


def write_shard(job: tuple) -> str:
    """One ImageNet-like shard (bench/common.py's recipe: smooth random content + noise, JPEG q90),
    unique keys per shard; written under a temporary name, renamed when whole."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    folder, index, per_shard, (width, height), num_classes, seed = job
    rng = np.random.default_rng([seed, index])
    path = Path(folder) / f"bench-{index:06d}.tar"
    partial = Path(folder) / f"partial-{index:06d}.tmp"
    with wds.TarWriter(str(partial), mtime=0) as writer:
        for i in range(per_shard):
            small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
            image = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC), np.int16)
            image = image + rng.integers(-12, 12, (height, width, 3), dtype=np.int16)
            buffer = io.BytesIO()
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
            writer.write({"__key__": f"s{index:04d}_{i:05d}", "jpg": buffer.getvalue(),
                          "cls": int(rng.integers(0, num_classes))})
    partial.rename(path)
    return str(path)


# ---- settings per mode ------------------------------------------------------------------------------


def settings(args) -> dict:
    if args.toy:
        return dict(
            teacher="dho-tiny-teacher", student="dho-tiny-student", device="cpu", batches=[4, 8, 16],
            shards=2, per_shard=64, image=(64, 48), label_classes=20, gen_procs=2, workers=2,
            train_batches=[16, 8], cached_steps=8, online_steps=6, log_every=2, warmup_steps=2,
            measure_seconds=0.15, compile_backend=args.compile_backend or "aot_eager", stage_precision="bf16",
            stage_compile=True,
            caps=dict(teacher_model=60, cache_teacher=60, train=90, teacher_compile=60),
        )
    return dict(
        teacher="ViT-H-14-378-quickgelu", student="ViT-B-16-quickgelu", device="cuda", batches=[64, 128, 256],
        shards=24, per_shard=512, image=(500, 375), label_classes=100, gen_procs=14, workers=14,
        train_batches=[256, 128], cached_steps=50, online_steps=20, log_every=5, warmup_steps=10,
        measure_seconds=2.5, compile_backend=args.compile_backend or "inductor", stage_precision=None,
            stage_compile=None,
        caps=dict(teacher_model=170, cache_teacher=150, train=230, teacher_compile=150),
    )


PEAK_BF16_DENSE = [  # (substring of the device name, peak dense bf16 FLOP/s)
    ("H200", 989.4e12), ("GH200", 989.4e12), ("H100 PCIe", 756.5e12), ("H100 NVL", 835.0e12), ("H100", 989.4e12),
    ("A100", 312.0e12),
]


def peak_flops(device_name: str | None):
    if not device_name:
        return None, None
    for key, value in PEAK_BF16_DENSE:
        if key in device_name:
            return value, key
    return None, None


# ---- section 0: environment -------------------------------------------------------------------------


def section_env(ctx) -> dict:
    import torch

    env: dict = {"args": vars(ctx["args"]), "settings": ctx["cfg"], "python": platform.python_version(),
                 "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                 "cuda_available": torch.cuda.is_available(), "regex": ctx["regex"],
                 "pythonpath": os.environ.get("PYTHONPATH")}
    try:
        usage = shutil.disk_usage("/dev/shm")
        env["dev_shm_gb"] = usage.total / 2**30
    except OSError:
        env["dev_shm_gb"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device_name=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                   memory_gb=props.total_memory / 2**30, cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(),
                   sdpa_backends={"flash": torch.backends.cuda.flash_sdp_enabled(),
                                  "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                                  "math": torch.backends.cuda.math_sdp_enabled(),
                                  "cudnn": getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: None)()})
    try:
        env["mha_fastpath_enabled"] = torch.backends.mha.get_fastpath_enabled()
    except Exception:
        env["mha_fastpath_enabled"] = None
    versions = {}
    import warnings

    for name in ("open_clip", "webdataset", "zarr", "numcodecs", "timm", "accelerate", "huggingface_hub", "ftfy",
                 "wcwidth", "braceexpand", "donfig", "yaml", "safetensors", "tqdm", "PIL", "numpy", "triton",
                 "tensorboard", "torchvision", "click"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = __import__(name)
                versions[name] = getattr(module, "__version__", "present")
        except Exception as error:  # ImportError, or a broken install
            versions[name] = f"MISSING ({type(error).__name__}: {error})"
    env["packages"] = versions
    env["c_compiler"] = shutil.which("cc") or shutil.which("gcc")
    name = env.get("device_name")
    env["peak_bf16_flops"], env["peak_key"] = peak_flops(name)
    ctx["peak"], ctx["device_name"] = env["peak_bf16_flops"], name
    if torch.cuda.is_available():  # what a plain bf16 matrix product reaches here (MFU is also given against it)
        try:
            env["measured_bf16_matmul_flops"] = ctx["measured_peak"] = measured_matmul_flops(torch)
            say(f"bf16 8192^3 matmul: {env['measured_bf16_matmul_flops'] / 1e12:.0f} TFLOP/s")
        except Exception as error:
            env["measured_bf16_matmul_flops"] = f"error: {error}"
    say(f"device: {name or 'cpu'}; peak bf16 dense {env['peak_bf16_flops']}; torch {torch.__version__}; "
        f"regex: {ctx['regex']['using']}; /dev/shm {env['dev_shm_gb']} GB")
    missing = [k for k, v in versions.items() if str(v).startswith("MISSING")]
    if missing:
        say(f"missing imports: {', '.join(missing)}")
    return env


def measured_matmul_flops(torch, size: int = 8192, reps: int = 10) -> float:
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    flops = 2 * size**3 * reps / (time.perf_counter() - started)
    del a, b
    torch.cuda.empty_cache()
    return flops


# ---- section 1: the teacher, model only --------------------------------------------------------------


def analytic_flops(visual, num_classes: int):
    """2 x multiply-adds of the ViT: patch embedding, L blocks (projections, MLP, attention), head."""
    try:
        tr = visual.transformer
        width, layers = tr.width, tr.layers
        mlp = tr.resblocks[0].mlp.c_fc.out_features
        gh, gw = visual.grid_size
        patches = gh * gw
        tokens = patches + (1 if getattr(visual, "class_embedding", None) is not None else 0)
        conv = visual.conv1.weight
        patch_in = conv.shape[1] * conv.shape[2] * conv.shape[3]
        embed = visual.proj.shape[1] if getattr(visual, "proj", None) is not None else width
        per_block = 2 * tokens * (4 * width * width + 2 * width * mlp) + 2 * 2 * tokens * tokens * width
        return int(layers * per_block + 2 * patches * patch_in * width + 2 * width * embed + 2 * embed * num_classes)
    except Exception:
        return None


def kernel_kind(name: str) -> str:
    low = name.lower()
    if any(k in low for k in ("flash", "fmha", "attention", "attn", "sdpa")):
        return "attention"
    if any(k in low for k in ("gemm", "xmma", "cutlass", "nvjet", "cublas", "sm90_", "sm80_", "wgmma", "addmm",
                              "bmm", "matmul")) or low.endswith("::mm"):
        return "gemm"
    if "layer_norm" in low or "layernorm" in low:
        return "layernorm"
    if "copy" in low or "transpose" in low or "memcpy" in low or "cat_" in low:
        return "copy/transpose"
    if "elementwise" in low or "vectorized" in low or "unrolled" in low or low in (
            "aten::mul", "aten::add", "aten::add_", "aten::sigmoid", "aten::sub", "aten::div", "aten::gelu"):
        return "elementwise"
    if "reduce" in low or "softmax" in low:
        return "reduction"
    if "conv" in low:
        return "conv"
    return "other"


def profile_forward(call, device) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    attention_ops = sorted({e.key for e in events if any(
        k in e.key.lower() for k in ("attention", "flash", "fmha", "multi_head", "mha", "sdp"))})

    def device_time(e):
        if device.type != "cuda":
            return e.self_cpu_time_total
        for attr in ("self_device_time_total", "self_cuda_time_total"):
            value = getattr(e, attr, None)
            if value:
                return value
        return 0

    if device.type == "cuda":  # kernels only (aten ops carry their kernels' time too: no double counting)
        kernel = getattr(torch.autograd, "DeviceType", None)
        timed = [(e.key, device_time(e)) for e in events if device_time(e) > 0 and (
            getattr(e, "device_type", None) == kernel.CUDA if kernel is not None and hasattr(e, "device_type")
            else not e.key.startswith(("aten::", "cuda", "cuLaunch")))]
    else:
        timed = [(e.key, device_time(e)) for e in events if e.key.startswith("aten::") and device_time(e) > 0]
    total = sum(t for _, t in timed) or 1
    kinds: dict = {}
    for key, t in timed:
        kinds[kernel_kind(key)] = kinds.get(kernel_kind(key), 0) + t / total
    top = sorted(timed, key=lambda kt: -kt[1])[:12]
    return {"attention_ops": attention_ops, "time_share_by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "top": [{"name": k[:140], "ms": t / 1000, "share": t / total} for k, t in top], "total_ms": total / 1000}


def timed_iterations(call, sync, target_seconds: float, warmup: int = 2, min_iters: int = 3, max_iters: int = 60):
    for _ in range(max(0, warmup - 1)):
        call()
    sync()
    started = time.perf_counter()
    call()
    sync()
    one = time.perf_counter() - started
    iters = int(min(max_iters, max(min_iters, math.ceil(target_seconds / max(one, 1e-6)))))
    started = time.perf_counter()
    for _ in range(iters):
        call()
    sync()
    return (time.perf_counter() - started) / iters, iters


def section_teacher_model(ctx) -> dict:
    import torch

    from dho_pipeline.clip_models import load_clip
    from dho_pipeline.teacher import ZeroShotTeacher

    cfg, fig = ctx["cfg"], ctx["fig"]
    device = torch.device(cfg["device"])
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    peak = ctx.get("peak")
    fig.update(teacher=cfg["teacher"], device=ctx.get("device_name") or "cpu", peak_bf16_flops=peak, variants={})

    started = time.perf_counter()
    loaded = load_clip(cfg["teacher"], "none")
    visual = loaded.model.visual
    image_size = loaded.preprocess.image_size
    mean, std = loaded.preprocess.mean, loaded.preprocess.std
    del loaded
    gc.collect()
    embed_dim = getattr(visual, "output_dim", None) or visual.proj.shape[1]
    classifier = torch.randn(1000, embed_dim, generator=torch.Generator().manual_seed(0))
    teacher = ZeroShotTeacher(visual, classifier).to(device).eval()
    fig["build_seconds"] = time.perf_counter() - started
    fig["image_size"] = list(image_size)
    fig["parameters_visual_m"] = sum(p.numel() for p in visual.parameters()) / 1e6
    say(f"teacher {cfg['teacher']} built in {fig['build_seconds']:.1f}s, {fig['parameters_visual_m']:.0f}M params, "
        f"input {image_size}")
    save("teacher_model", fig)

    # the generated shards must be finished before anything is timed (they share the CPU)
    try:
        wait_for_data(ctx)
    except Exception as error:  # section 2 reports it; the model-only figures do not need the data
        fig["data_error"] = error_text(error)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def make_input(batch, channels_last=False, dtype=torch.float32):
        x = torch.randn(batch, 3, *image_size, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.to(dtype)

    # ---- FLOPs per image ----
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), autocast(), FlopCounterMode(display=False) as counter:
        teacher(make_input(1))
    flops = counter.get_total_flops()
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    fig["flops_per_image"] = {"flop_counter": flops, "by_op": by_op, "analytic": analytic_flops(visual, 1000),
                              "note": "multiply-add = 2 FLOPs; FlopCounterMode under bf16 autocast, one image"}
    attention_counted = any("attention" in k for k in by_op)
    flops_per_image = flops
    if not attention_counted and fig["flops_per_image"]["analytic"]:
        fig["flops_per_image"]["warning"] = "FlopCounterMode counted no attention op here; MFU uses the analytic figure"
        flops_per_image = fig["flops_per_image"]["analytic"]
    fig["flops_per_image"]["used"] = flops_per_image
    ctx["flops_per_image"] = flops_per_image
    say(f"FLOPs/image: counter {flops / 1e12:.3f} T, analytic {(fig['flops_per_image']['analytic'] or 0) / 1e12:.3f} T")

    # ---- open_clip's attention: what exists, what runs ----
    import open_clip

    block = visual.transformer.resblocks[0]
    attn = block.attn
    fig["attention"] = {
        "block_class": type(block).__name__, "attn_class": type(attn).__name__,
        "batch_first": getattr(attn, "batch_first", None), "num_heads": getattr(attn, "num_heads", None),
        "head_dim": getattr(attn, "head_dim", None),
        "open_clip_version": open_clip.__version__,
        "open_clip_flag": "vision_cfg block_type='custom' -> CustomResidualAttentionBlock + open_clip.transformer."
                          "Attention, which calls F.scaled_dot_product_attention itself (use_fsdpa); parameter "
                          "names equal nn.MultiheadAttention's, so the same weights load",
        "default_block_note": "nn.MultiheadAttention(batch_first=True), need_weights=False: under autocast "
                              "F.multi_head_attention_forward (seq-first transposes) -> SDPA; with bf16 weights, "
                              "no autocast, inference: the fused fast path _native_multi_head_attention",
    }
    save("teacher_model", fig)

    def record(variant: str, batch: int, entry: dict):
        fig["variants"].setdefault(variant, {})[str(batch)] = entry
        best = best_of(list(fig["variants"]))  # kept current, so a cap mid-section still leaves a headline
        fig["best"] = {"variant": best[0], "batch": best[1], "images_per_second": best[2],
                       "mfu": best[2] * flops_per_image / peak if peak else None} if best else None
        HEADLINE["teacher_model"] = fig["best"]
        save("teacher_model", fig)

    def run_variant(variant, model, batches, *, channels_last=False, bf16_weights=False, use_autocast=True):
        for batch in batches:
            x = None
            try:
                x = make_input(batch, channels_last, torch.bfloat16 if bf16_weights else torch.float32)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                with torch.inference_mode(), (autocast() if use_autocast else nullcontext()):
                    seconds, iters = timed_iterations(lambda: model(x), sync, cfg["measure_seconds"])
                ips = batch / seconds
                entry = {"images_per_second": ips, "seconds_per_batch": seconds, "iters": iters,
                         "mfu": ips * flops_per_image / peak if peak else None,
                         "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
                say(f"  {variant:28s} batch {batch:4d}: {ips:8.1f} img/s"
                    + (f", MFU {entry['mfu']:.1%}" if entry["mfu"] else ""))
            except Exception as error:
                entry = {"error": ("OOM: " if is_oom(error) else "") + str(error)[:500]}
                say(f"  {variant} batch {batch}: FAILED {str(error)[:200]}")
            finally:
                x = None  # free the batch before the next size
                free_memory()
            record(variant, batch, entry)

    def best_of(variants):
        best = None
        for variant in variants:
            for batch, entry in fig["variants"].get(variant, {}).items():
                ips = entry.get("images_per_second")
                if ips and (best is None or ips > best[2]):
                    best = (variant, int(batch), ips)
        return best

    quick = ctx["args"].quick
    batches = cfg["batches"][-1:] if quick else cfg["batches"]
    say("section 1: fp32 weights + bf16 autocast (cache-teacher's first default)")
    run_variant("eager_autocast", teacher, batches)
    if not quick:
        with torch.inference_mode(), autocast():
            fig["attention"]["profile_autocast"] = profile_forward(lambda: teacher(make_input(batches[0])), device)
    save("teacher_model", fig)

    say("section 1: weights cast to bf16 (.to(torch.bfloat16)), no autocast")
    teacher_bf16 = copy.deepcopy(teacher)
    teacher_bf16.visual.to(torch.bfloat16)  # the classifier stays fp32, as ZeroShotTeacher expects
    run_variant("eager_bf16", teacher_bf16, batches, bf16_weights=True, use_autocast=False)
    if not quick:
        with torch.inference_mode():
            fig["attention"]["profile_bf16"] = profile_forward(
                lambda: teacher_bf16(make_input(batches[0], dtype=torch.bfloat16)), device)
    save("teacher_model", fig)

    # cache-teacher runs bf16 weights: its best batch is the one section 2 uses
    autocast_best = best_of(["eager_bf16"]) or best_of(["eager_autocast"])
    best_batch = autocast_best[1] if autocast_best else batches[-1]
    ctx["best_batch"] = best_batch
    fig["best_batch"] = best_batch

    # ---- what cache-teacher runs by default: the library's TeacherRunner (bf16 tower, compiled, padded) ----
    runner = None
    try:
        from dho_pipeline.teacher import TeacherRunner

        say(f"section 1: dho_pipeline TeacherRunner(bf16, compile) at batch {best_batch} (compiles first)")
        runner = TeacherRunner(teacher_bf16, dtype=torch.bfloat16, compile=True, batch_size=best_batch)
        x = make_input(best_batch)
        started = time.perf_counter()
        with time_cap(min(ctx["args"].compile_cap, remaining() - 5), "TeacherRunner compile"):
            runner(x)
            sync()
        fig["runner_compile_seconds"] = time.perf_counter() - started
        with torch.inference_mode():
            reference = teacher(x[:8]).float()
        fig["runner_max_abs_logit_diff_vs_fp32"] = (runner(x)[:8] - reference).abs().max().item()
        seconds, iters = timed_iterations(lambda: runner(x), sync, cfg["measure_seconds"])
        ips = best_batch / seconds
        record("runner_bf16_compiled", best_batch, {
            "images_per_second": ips, "seconds_per_batch": seconds, "iters": iters,
            "mfu": ips * flops_per_image / peak if peak else None, "compile_seconds": fig["runner_compile_seconds"]})
        say(f"  runner batch {best_batch}: {ips:.1f} img/s (compiled in {fig['runner_compile_seconds']:.1f}s)")
        x = None
    except (Exception, CapExceeded) as error:
        runner = None
        record("runner_bf16_compiled", best_batch, {"error": error_text(error)})
        say(f"  runner FAILED: {str(error)[:200]}")
    free_memory()

    if quick:
        return _stage_path_and_model_only(ctx, fig, record, runner or teacher_bf16, mean, std, image_size, best_batch,
                                          flops_per_image, peak, sync)

    say(f"section 1: channels-last input at batch {best_batch}")
    run_variant("eager_autocast_channels_last", teacher, [best_batch], channels_last=True)
    run_variant("eager_bf16_channels_last", teacher_bf16, [best_batch], channels_last=True, bf16_weights=True,
                use_autocast=False)

    # ---- open_clip's own SDPA block (block_type "custom"), same weights ----
    sdpa_visual = sdpa_teacher = None
    try:
        say(f"section 1: open_clip block_type='custom' (direct F.scaled_dot_product_attention) at batch {best_batch}")
        from open_clip.model import _build_vision_tower

        from dho_pipeline.clip_models import resolve_model_name

        model_cfg = open_clip.get_model_config(resolve_model_name(cfg["teacher"]))
        vision_cfg = dict(model_cfg["vision_cfg"], block_type="custom")
        with torch.device("meta"):
            sdpa_visual = _build_vision_tower(model_cfg["embed_dim"], vision_cfg,
                                              quick_gelu=model_cfg.get("quick_gelu", False))
        sdpa_visual = sdpa_visual.to_empty(device=device)
        missing = sdpa_visual.load_state_dict(teacher.visual.state_dict(), strict=True)
        sdpa_teacher = ZeroShotTeacher(sdpa_visual, classifier).to(device).eval()
        with torch.inference_mode(), autocast():
            probe = make_input(2)
            diff = (sdpa_teacher(probe) - teacher(probe)).abs().max().item()
        fig["attention"]["sdpa_block"] = {"load_state_dict": str(missing), "max_abs_logit_diff_vs_default": diff}
        run_variant("sdpa_block_autocast", sdpa_teacher, [best_batch])
        sdpa_teacher.visual.to(torch.bfloat16)
        run_variant("sdpa_block_bf16", sdpa_teacher, [best_batch], bf16_weights=True, use_autocast=False)
        with torch.inference_mode():
            fig["attention"]["profile_sdpa_block_bf16"] = profile_forward(
                lambda: sdpa_teacher(make_input(batches[0], dtype=torch.bfloat16)), device)
    except Exception as error:
        fig["attention"]["sdpa_block"] = {"error": error_text(error)}
        say(f"  sdpa block variant FAILED: {str(error)[:200]}")
    save("teacher_model", fig)

    _stage_path_and_model_only(ctx, fig, record, runner or teacher_bf16, mean, std, image_size, best_batch,
                               flops_per_image, peak, sync)

    # keep the best eager model (on the CPU) for the compile section at the end
    kept = {"eager_autocast": (teacher, False, False, True), "eager_autocast_channels_last": (teacher, True, False, True),
            "eager_bf16": (teacher_bf16, False, True, False), "eager_bf16_channels_last": (teacher_bf16, True, True, False),
            "sdpa_block_bf16": (sdpa_teacher, False, True, False)}
    eager_best = best_of([v for v in kept if v in fig["variants"]])
    if eager_best and kept[eager_best[0]][0] is not None:
        model, channels_last, bf16_weights, use_autocast = kept[eager_best[0]]
        ctx["compile_candidate"] = dict(variant=eager_best[0], batch=eager_best[1], eager_ips=eager_best[2],
                                        model=model.to("cpu"), channels_last=channels_last,
                                        bf16_weights=bf16_weights, use_autocast=use_autocast, image_size=image_size)
    return fig


def _stage_path_and_model_only(ctx, fig, record, model, mean, std, image_size, best_batch, flops_per_image, peak, sync):
    """cache-teacher's per-batch path with its default model; and which model-only figure section 2 compares to."""
    import torch

    cfg = ctx["cfg"]
    device = torch.device(cfg["device"])
    try:
        say(f"section 1: cache-teacher's per-batch path (uint8 pinned -> Normalizer -> runner -> top-k -> .cpu()) "
            f"at batch {best_batch}")
        from dho_pipeline.pixels import Normalizer
        from dho_pipeline.teacher import summarize_logits

        normalize = Normalizer(mean, std, device)
        pixels = torch.randint(0, 256, (best_batch, *image_size, 3), dtype=torch.uint8)
        if device.type == "cuda":
            pixels = pixels.pin_memory()

        def stage_step():
            logits = model(normalize(pixels))
            indices, values, log_partition = summarize_logits(logits, 100, [1.0, 2.0])
            return indices.cpu().numpy(), values.cpu().numpy(), log_partition.cpu().numpy()

        with torch.inference_mode():
            seconds, iters = timed_iterations(stage_step, sync, cfg["measure_seconds"])
        ips = best_batch / seconds
        record("stage_path", best_batch, {
            "images_per_second": ips, "seconds_per_batch": seconds, "iters": iters,
            "mfu": ips * flops_per_image / peak if peak else None})
        say(f"  stage path batch {best_batch}: {ips:.1f} img/s")
    except Exception as error:
        record("stage_path", best_batch, {"error": error_text(error)})

    chosen = None
    for variant in ("runner_bf16_compiled", "eager_bf16"):
        ips = fig["variants"].get(variant, {}).get(str(best_batch), {}).get("images_per_second")
        if ips:
            chosen = {"variant": variant, "batch": best_batch, "images_per_second": ips}
            break
    fig["model_only_for_stage"] = ctx["model_only"] = chosen
    ctx["stage_path_ips"] = fig["variants"].get("stage_path", {}).get(str(best_batch), {}).get("images_per_second")
    save("teacher_model", fig)
    return fig


# ---- data (generated in the background during section 1) ---------------------------------------------


def start_data(ctx):
    cfg, work = ctx["cfg"], ctx["work"]
    folder = work / "shards"
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder), s, cfg["per_shard"], cfg["image"], cfg["label_classes"], 0) for s in range(cfg["shards"])]
    pool = multiprocessing.get_context("fork").Pool(cfg["gen_procs"])
    ctx["data"] = {"pool": pool, "result": pool.map_async(write_shard, jobs), "started": time.perf_counter(),
                   "folder": folder}
    say(f"generating {cfg['shards']} shards x {cfg['per_shard']} JPEGs {cfg['image']} with {cfg['gen_procs']} processes")


def wait_for_data(ctx) -> list[str]:
    data = ctx["data"]
    if "paths" not in data:
        paths = data["result"].get(timeout=max(1.0, remaining()))
        data["pool"].close()
        data["pool"].join()
        data["paths"] = sorted(paths)
        data["seconds"] = time.perf_counter() - data["started"]
        size = sum(os.path.getsize(p) for p in paths)
        data["bytes"] = size
        say(f"data ready: {len(paths)} shards, {size / 2**20:.0f} MiB, done {data['seconds']:.1f}s after start")
    return data["paths"]


def ensure_inputs(ctx) -> list[str]:
    """Shards, manifest, class list (class0..class999) and one template: made once, used by sections 2-3."""
    import dho_pipeline.stages.manifest as manifest_stage

    paths = wait_for_data(ctx)
    if "manifest" not in ctx:
        work = ctx["work"]
        started = time.perf_counter()
        manifest_stage.run(manifest_stage.Config(shards=(str(ctx["data"]["folder"] / "bench-*.tar"),),
                                                 out=work / "manifest.json", workers=8))
        classes, templates = work / "classes.txt", work / "templates.txt"
        classes.write_text("".join(f"class{i}\n" for i in range(1000)))
        templates.write_text("a photo of a {}.\n")
        ctx.update(manifest=work / "manifest.json", classes=classes, templates=templates,
                   manifest_seconds=time.perf_counter() - started)
    return paths


# ---- section 2: the real cache-teacher stage ------------------------------------------------------------


def section_cache_teacher(ctx) -> dict:
    import torch

    import dho_pipeline.stages.cache_teacher as cache_stage
    from dho_pipeline import teacher as teacher_module

    cfg, fig, work = ctx["cfg"], ctx["fig"], ctx["work"]
    paths = ensure_inputs(ctx)
    fig["data"] = {"shards": len(paths), "per_shard": cfg["per_shard"], "image": list(cfg["image"]),
                   "bytes": ctx["data"]["bytes"], "generate_seconds": ctx["data"]["seconds"],
                   "manifest_seconds": ctx["manifest_seconds"]}
    classes, templates = ctx["classes"], ctx["templates"]

    batch = ctx.get("best_batch") or cfg["batches"][-1]
    cache = work / "cache.zarr"
    config = cache_stage.Config(manifest=work / "manifest.json", out=cache, teacher=cfg["teacher"], pretrained="none",
                                classnames=classes, templates=templates, views=1, topk=100, batch_size=batch,
                                workers=cfg["workers"], device=None if cfg["device"] == "cuda" else cfg["device"],
                                precision=cfg["stage_precision"], compile=cfg["stage_compile"])
    fig["config"] = {"teacher": cfg["teacher"], "views": 1, "topk": 100, "batch_size": batch, "workers": cfg["workers"],
                     "workers_used": min(cfg["workers"], len(paths))}
    save("cache_teacher", fig)

    calls: list = []
    built: list = []
    original_forward, original_init = teacher_module.TeacherRunner.__call__, teacher_module.ZeroShotTeacher.__init__

    def forward(self, images):  # the runner's call (the teacher's forward itself may be compiled)
        calls.append((time.perf_counter(), int(images.shape[0])))
        return original_forward(self, images)

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        built.append(time.perf_counter())

    teacher_module.TeacherRunner.__call__, teacher_module.ZeroShotTeacher.__init__ = forward, init
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    say(f"section 2: cache-teacher {cfg['teacher']} batch {batch} workers {cfg['workers']} over {len(paths)} shards")
    started = time.perf_counter()
    summary = None

    def figures_of(ended: float) -> None:
        images = sum(n for _, n in calls)
        fig["summary"] = summary
        if summary and summary.get("complete"):
            ctx["cache"] = cache
        fig["run_seconds"] = ended - started
        fig["teacher_setup_seconds"] = (built[0] - started) if built else None
        fig["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        figures = {"images": images, "batches": len(calls)}
        if len(calls) >= 4:
            steady_images = images - calls[0][1] - calls[-1][1]
            steady_seconds = calls[-1][0] - calls[1][0]
            figures["steady_images_per_second"] = steady_images / steady_seconds
            figures["first_call_seconds"] = calls[1][0] - calls[0][0]
            figures["steady_note"] = "batches 1..n-2 between the second and the last teacher call (excludes set-up, " \
                                     "the first call's compile, pipeline fill and the writer's tail; each batch ends " \
                                     "in .cpu(), so it is synced)"
        figures["first_batch_wait_seconds"] = (calls[0][0] - built[0]) if calls and built else None
        figures["images_per_second_after_setup"] = images / (ended - built[0]) if built else None
        figures["images_per_second_whole_run"] = images / (ended - started)
        timings_path = Path(str(cache) + ".timings.jsonl")
        timings = [json.loads(line) for line in timings_path.read_text().splitlines() if line.strip()] \
            if timings_path.exists() else []
        fig["per_shard"] = [{k: t.get(k) for k in ("shard", "images", "read_seconds", "compute_seconds", "write_seconds",
                                                    "wall_seconds")} for t in timings]
        read = sum(t["read_seconds"] for t in timings)
        compute = sum(t["compute_seconds"] for t in timings)
        write = sum(t["write_seconds"] for t in timings)
        workers_used = fig["config"]["workers_used"]
        loop = (calls[-1][0] - calls[0][0]) if len(calls) > 1 else None
        figures.update(read_seconds_total=read, compute_seconds_total=compute, write_seconds_total=write,
                       read_seconds_per_worker=read / max(1, workers_used),
                       device_busy_share_of_loop=(compute / (ended - calls[0][0])) if calls else None,
                       input_bound=(read / max(1, workers_used)) > compute,
                       input_bound_note="read seconds per worker (workers decode in parallel) vs the main process's "
                                        "compute seconds (teacher + top-k + .cpu()); > means input-bound")
        model_only = (ctx.get("model_only") or {}).get("images_per_second")
        steady = figures.get("steady_images_per_second") or figures["images_per_second_after_setup"]
        figures["model_only_images_per_second"] = model_only
        figures["model_only_variant"] = ctx.get("model_only")
        figures["stage_path_images_per_second"] = ctx.get("stage_path_ips")
        figures["ratio_steady_to_model_only"] = steady / model_only if model_only and steady else None
        figures["ratio_after_setup_to_model_only"] = (figures["images_per_second_after_setup"] / model_only
                                                      if model_only and figures["images_per_second_after_setup"] else None)
        figures["ratio_steady_to_stage_path"] = steady / ctx["stage_path_ips"] if ctx.get("stage_path_ips") else None
        figures["loop_seconds"] = loop
        fig["figures"] = figures
        HEADLINE["cache_teacher"] = {k: figures.get(k) for k in (
            "steady_images_per_second", "images_per_second_after_setup", "model_only_images_per_second",
            "ratio_steady_to_model_only", "input_bound")}
        say(f"cache-teacher: {images} images, steady {figures.get('steady_images_per_second') or 0:.1f} img/s, "
            f"after set-up {figures['images_per_second_after_setup'] or 0:.1f} img/s, ratio to model-only "
            f"{figures['ratio_steady_to_model_only'] or 0:.3f}; read/worker {read / max(1, workers_used):.1f}s vs compute {compute:.1f}s")

    try:
        summary = cache_stage.run(config)
    finally:
        ended = time.perf_counter()
        teacher_module.TeacherRunner.__call__, teacher_module.ZeroShotTeacher.__init__ = original_forward, original_init
        try:  # also when the run fails or the section cap stops it: what was measured so far
            figures_of(ended)
        except Exception as error:
            fig["figures_error"] = error_text(error)
    return fig


# ---- section 3: stage two, cached vs online teacher ----------------------------------------------------


def train_rates(run_dir: Path, warmup_steps: int, log_every: int, steps_per_epoch: int | None = None) -> dict:
    """samples/s over the metrics windows after warm-up, leaving out windows that hold an epoch-end
    checkpoint (written after the log line of its step, so it lands in the window after an epoch end
    that falls on a log step)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "samples_per_second" in r]

    def holds_checkpoint(step: int) -> bool:
        return bool(steps_per_epoch) and any(e % steps_per_epoch == 0 for e in range(max(1, step - log_every), step))

    used = [r for r in rows if r["step"] - log_every >= warmup_steps and not holds_checkpoint(r["step"])]
    result = {"windows": [{"step": r["step"], "samples_per_second": r["samples_per_second"],
                           "data_wait_fraction": r.get("data_wait_fraction")} for r in rows],
              "steps_measured": [r["step"] for r in used], "steps_per_epoch": steps_per_epoch}
    if used:
        result["samples_per_second"] = len(used) / sum(1 / r["samples_per_second"] for r in used)  # equal samples
        result["data_wait_fraction"] = sum(r.get("data_wait_fraction") or 0 for r in used) / len(used)
    return result


def section_train(ctx) -> dict:
    import torch

    import dho_pipeline.stages.split as split_stage
    import dho_pipeline.stages.train as train_stage

    cfg, fig, work = ctx["cfg"], ctx["fig"], ctx["work"]
    ensure_inputs(ctx)
    split = work / "split.json"
    drawn = split_stage.run(split_stage.Config(manifest=ctx["manifest"], out=split, percent=10))
    fig["split"] = {"percent": 10, "labeled": int(getattr(drawn, "num_labeled", -1)),
                    "unlabeled": int(getattr(drawn, "num_unlabeled", -1))}
    fig["runs"] = {}
    save("train", fig)
    device = None if cfg["device"] == "cuda" else cfg["device"]

    def run(mode: str, batch: int) -> dict:
        out = work / f"run-{mode}-b{batch}"
        shutil.rmtree(out, ignore_errors=True)
        steps = cfg["cached_steps"] if mode == "cached" else cfg["online_steps"]
        entry = {"batch": batch, "steps": steps}
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        say(f"section 3: train {mode} {cfg['student']} batch {batch}+{batch}, {steps} steps, workers {cfg['workers']}")
        started = time.perf_counter()
        try:
            common = dict(manifest=ctx["manifest"], split=split, out=out, student=cfg["student"], pretrained="none",
                          batch_size=batch, workers=cfg["workers"], max_steps=steps, log_every=cfg["log_every"],
                          device=device, precision=cfg["stage_precision"], compile=cfg["stage_compile"])
            if mode == "cached":
                if "cache" not in ctx:
                    raise RuntimeError("no complete cache from section 2")
                config = train_stage.Config(cache=ctx["cache"], **common)
            else:
                config = train_stage.Config(cache=None, teacher_online=True, teacher=cfg["teacher"],
                                            teacher_pretrained="none", classnames=ctx["classes"],
                                            templates=ctx["templates"], **common)
            entry["summary"] = train_stage.run(config)
            per_epoch = entry["summary"]["total_steps"] // config.epochs
            entry.update(train_rates(out, cfg["warmup_steps"], cfg["log_every"], per_epoch))
            say(f"  {mode} batch {batch}: {entry.get('samples_per_second') or 0:.1f} samples/s "
                f"(data wait {entry.get('data_wait_fraction') or 0:.0%})")
        except Exception as error:
            entry["error"] = ("OOM: " if is_oom(error) else "") + error_text(error)
            entry["oom"] = is_oom(error)
            say(f"  {mode} batch {batch}: FAILED {str(error)[:200]}")
        except CapExceeded as error:  # keep the windows logged so far, then stop the section
            entry["error"] = f"stopped: {error}"
            try:
                entry.update(train_rates(out, cfg["warmup_steps"], cfg["log_every"]))
            except Exception:
                pass
            raise
        finally:
            entry["seconds"] = time.perf_counter() - started
            entry["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
            fig["runs"][f"{mode}-b{batch}"] = entry
            free_memory()
            save("train", fig)
        return entry

    def compare(batch):
        cached, online = fig["runs"].get(f"cached-b{batch}", {}), fig["runs"].get(f"online-b{batch}", {})
        a, b = cached.get("samples_per_second"), online.get("samples_per_second")
        if a and b:
            fig["comparison"] = {"batch": batch, "cached_samples_per_second": a, "online_samples_per_second": b,
                                 "speedup_cached_over_online": a / b, "target": 8.0, "meets": a / b >= 8.0,
                                 "note": "same samples per epoch both ways, so the ratio is the per-epoch speedup"}
            HEADLINE["train"] = fig["comparison"]
            say(f"train: cached {a:.1f} vs online {b:.1f} samples/s at {batch}+{batch}: {a / b:.2f}x")
            return True
        return False

    first, second = cfg["train_batches"]
    batch = first
    try:
        cached = run("cached", first)
        if cached.get("oom"):
            batch = second
            run("cached", batch)
        online = run("online", batch)
        if online.get("oom") and batch != second:
            online = run("online", second)
            if not online.get("error"):
                run("cached", second)
                batch = second
    finally:  # also when the section cap stops a run: partial windows may still compare
        compared = compare(batch)
    if not compared:
        raise RuntimeError("no cached-vs-online comparison (see runs for each run's error)")
    return fig


# ---- section 4: torch.compile of the best eager variant ------------------------------------------------


def section_teacher_compile(ctx) -> dict:
    import torch

    cfg, fig = ctx["cfg"], ctx["fig"]
    candidate = ctx.get("compile_candidate")
    if not candidate:
        raise RuntimeError("no eager variant from section 1 to compile")
    device = torch.device(cfg["device"])
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    peak, flops = ctx.get("peak"), ctx.get("flops_per_image")
    model = candidate["model"].to(device)
    batch = candidate["batch"]
    fig.update(variant=candidate["variant"], batch=batch, eager_images_per_second=candidate["eager_ips"],
               backend=cfg["compile_backend"], mode="default", cap_seconds=ctx["args"].compile_cap)
    x = torch.randn(batch, 3, *candidate["image_size"], device=device)
    if candidate["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    if candidate["bf16_weights"]:
        x = x.to(torch.bfloat16)
    context = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if candidate["use_autocast"] else nullcontext
    with torch.inference_mode(), context():
        reference = model(x[:batch]).float()
    sync()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=cfg["compile_backend"])
    say(f"section 4: torch.compile({candidate['variant']}, backend={cfg['compile_backend']}) at batch {batch}, "
        f"cap {ctx['args'].compile_cap:.1f}s")
    started = time.perf_counter()
    try:
        with time_cap(min(ctx["args"].compile_cap, remaining() - 5), "torch.compile"), torch.inference_mode(), context():
            out = compiled(x)
            sync()
    except CapExceeded as error:
        fig.update(status="skipped", reason=str(error), compile_seconds=time.perf_counter() - started)
        say(f"  compile skipped: {error}")
        torch._dynamo.reset()
        return fig
    fig["compile_seconds"] = time.perf_counter() - started
    fig["max_abs_logit_diff_vs_eager"] = (out.float() - reference).abs().max().item()
    say(f"  compiled in {fig['compile_seconds']:.1f}s; max |logit diff| vs eager {fig['max_abs_logit_diff_vs_eager']:.3g}")
    save("teacher_compile", fig)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode(), context():
        seconds, iters = timed_iterations(lambda: compiled(x), sync, cfg["measure_seconds"])
    ips = batch / seconds
    fig.update(status="ok", images_per_second=ips, seconds_per_batch=seconds, iters=iters,
               mfu=ips * flops / peak if peak and flops else None,
               speedup_over_eager=ips / candidate["eager_ips"],
               peak_memory_gb=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)
    HEADLINE["teacher_compile"] = {k: fig.get(k) for k in ("variant", "batch", "images_per_second", "mfu",
                                                           "compile_seconds", "speedup_over_eager")}
    say(f"  compiled {candidate['variant']} batch {batch}: {ips:.1f} img/s" + (f", MFU {fig['mfu']:.1%}" if fig["mfu"] else ""))
    return fig


# ---- summary -----------------------------------------------------------------------------------------


def write_summary(ctx) -> None:
    peak = ctx.get("peak")
    best = HEADLINE.get("teacher_model")
    compiled = HEADLINE.get("teacher_compile")
    overall = best
    if compiled and compiled.get("images_per_second") and (not best or compiled["images_per_second"] > best["images_per_second"]):
        overall = {"variant": f"compiled {compiled['variant']}", **{k: compiled[k] for k in ("batch", "images_per_second", "mfu")}}
    targets = {
        "teacher_mfu": {"target": 0.60, "best": overall, "target_images_per_second": 0.60 * peak / ctx["flops_per_image"]
                        if peak and ctx.get("flops_per_image") else None,
                        "meets": (overall["mfu"] >= 0.60) if overall and overall.get("mfu") is not None else None},
        "cache_teacher_ratio": {"target": 0.95, **(HEADLINE.get("cache_teacher") or {}),
                                "meets": (HEADLINE["cache_teacher"]["ratio_steady_to_model_only"] >= 0.95)
                                if (HEADLINE.get("cache_teacher") or {}).get("ratio_steady_to_model_only") else None},
        "train_speedup": {"target": 8.0, **(HEADLINE.get("train") or {})},
    }
    measured = ctx.get("measured_peak")
    if measured and overall and overall.get("images_per_second") and ctx.get("flops_per_image"):
        targets["teacher_mfu"]["mfu_vs_measured_matmul"] = overall["images_per_second"] * ctx["flops_per_image"] / measured
    cache = HEADLINE.get("cache_teacher") or {}
    if cache.get("steady_images_per_second") and overall and overall.get("images_per_second"):
        targets["cache_teacher_ratio"]["ratio_steady_to_best_model_only"] = \
            cache["steady_images_per_second"] / overall["images_per_second"]
    save("summary", {"mode": "toy" if ctx["args"].toy else "real", "device": ctx.get("device_name") or "cpu",
                     "regex": (ctx.get("regex") or {}).get("using"),
                     "targets": targets, "compile": compiled, "sections": STATUS, "log": LOG[-300:]})


# ---- main --------------------------------------------------------------------------------------------


def run_section(name: str, function, ctx) -> None:
    cap = min(ctx["cfg"]["caps"].get(name, 120), remaining())
    ctx["fig"] = {}
    started = time.perf_counter()
    say(f"=== section {name} (cap {cap:.0f}s, {remaining():.0f}s left in the budget)")
    status: dict = {"status": "running"}
    STATUS[name] = status
    try:
        if ctx["args"].inject_error == name:
            raise RuntimeError(f"injected failure in section {name} (--inject-error)")
        with time_cap(cap, f"section {name}"):
            function(ctx)
        status["status"] = "ok"
    except CapExceeded as error:
        status.update(status="timeout", error=str(error))
        say(f"section {name}: TIMEOUT ({error})")
    except Exception as error:
        status.update(status="error", error=error_text(error))
        say(f"section {name}: ERROR {type(error).__name__}: {str(error)[:300]}")
    finally:
        status["seconds"] = time.perf_counter() - started
        fig = ctx["fig"]
        fig["section_status"] = dict(status)
        if name != "env":
            save(name, fig)
        try:
            free_memory()
        except Exception:
            pass
        try:
            write_summary(ctx)
        except Exception as error:  # the summary must never stop the run
            say(f"summary not written: {error}")
        say(f"section {name}: {status['status']} in {status['seconds']:.1f}s")


def main(argv=None) -> int:
    global OUT, DEADLINE
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench-out/gpu", help="folder for the JSON figures")
    parser.add_argument("--toy", action="store_true", help="tiny models on the CPU: every code path in ~1-2 minutes")
    parser.add_argument("--work", default=None, help="scratch folder (shards, cache, runs); wiped at start")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole script (450; toy 200)")
    parser.add_argument("--quick", action="store_true",
                        help="section 1 at one batch size, no profiles or layout/attention variants (a rerun)")
    parser.add_argument("--compile-cap", type=float, default=90.0, help="skip torch.compile if compiling takes longer")
    parser.add_argument("--compile-backend", default=None, help="inductor (real) / aot_eager (toy)")
    parser.add_argument("--sections", default="teacher_model,cache_teacher,train,teacher_compile",
                        help="comma-separated subset, in this order")
    parser.add_argument("--regex-shim", choices=["auto", "force"], default=None,
                        help="auto: real regex if importable (default real run); force: always the stand-in (toy)")
    parser.add_argument("--inject-error", default=None, help="raise in this section (tests the error capture)")
    args = parser.parse_args(argv)
    try:
        sys.stdout.reconfigure(line_buffering=True)
        sys.stderr.reconfigure(line_buffering=True)
    except Exception:
        pass
    OUT = Path(args.out)
    DEADLINE = T0 + (args.budget or (200.0 if args.toy else 450.0))
    args.regex_shim = args.regex_shim or ("force" if args.toy else "auto")
    cfg = settings(args)
    work = Path(args.work or ("/tmp/dho-gpu-check-toy" if args.toy else "/tmp/dho-gpu-check"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ctx: dict = {"args": args, "cfg": cfg, "work": work}
    say(f"gpu_check {'TOY' if args.toy else 'REAL'}: out {OUT}, work {work}, budget {DEADLINE - T0:.0f}s")

    # before anything imports open_clip
    ctx["regex"] = setup_regex(args.regex_shim)
    import logging

    import tqdm as tqdm_module

    class QuietBar(tqdm_module.tqdm):  # the stages' progress bars would bury these lines in the output tail
        def __init__(self, *a, **k):
            k["disable"] = True
            super().__init__(*a, **k)

    tqdm_module.tqdm = QuietBar
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[dho_pipeline] %(message)s"))
    logging.getLogger("dho_pipeline").addHandler(handler)
    logging.getLogger("dho_pipeline").setLevel(logging.INFO)
    logging.getLogger("dho_pipeline").propagate = False

    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    if any(s in wanted for s in ("cache_teacher", "train", "teacher_model")):
        start_data(ctx)  # forked before CUDA is initialised

    ctx["fig"] = {}
    env = {}
    try:
        env = section_env(ctx)
        STATUS["env"] = {"status": "ok"}
    except Exception as error:
        STATUS["env"] = {"status": "error", "error": error_text(error)}
        say(f"env: ERROR {error}")
    save("env", env)
    import torch

    if not args.toy and not torch.cuda.is_available():
        say("no CUDA device: the real run needs one (use --toy on a CPU)")
        write_summary(ctx)
        return 2
    if args.toy:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    sections = {"teacher_model": section_teacher_model, "cache_teacher": section_cache_teacher,
                "train": section_train, "teacher_compile": section_teacher_compile}
    for name in wanted:
        if name not in sections:
            say(f"unknown section {name!r}; known: {', '.join(sections)}")
            continue
        run_section(name, sections[name], ctx)
    data = ctx.get("data")
    if data and "paths" not in data:
        data["pool"].terminate()
    write_summary(ctx)
    failed = [n for n, s in STATUS.items() if s.get("status") != "ok"]
    say(f"done in {time.perf_counter() - T0:.0f}s; sections not ok: {failed or 'none'}; figures in {OUT}")
    for name in sorted(p.name for p in OUT.glob("*.json")):
        say(f"  wrote {OUT / name}")
    return 0 if not failed else 1


if __name__ == "__main__":
    try:
        code = main()
    except SystemExit:  # --help, argument errors
        sys.stdout.flush()
        raise
    except BaseException as error:  # noqa: BLE001 - whatever happens, leave a summary behind
        say(f"FATAL {type(error).__name__}: {error}")
        STATUS["fatal"] = {"status": "error", "error": error_text(error)}
        try:
            save("summary", {"sections": STATUS, "log": LOG[-300:]})
        except Exception:
            pass
        code = 3
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: leftover compile-worker pools or loader threads must not hold the
    # device machine after the figures are written.
    os._exit(code)
