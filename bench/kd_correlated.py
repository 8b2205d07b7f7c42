"""KD fidelity of a top-k cache with correlated views and students that differ from the teacher systematically.

    BENCH_OUT=bench/results/cpu-2026-11-30 .venv/bin/python bench/kd_correlated.py

bench/kd_fidelity.py draws every view independently and makes the student the teacher plus independent
noise. Here the same measurement (bench/kd_fidelity.py's `fidelity`: top-k KD loss and gradient against
the full KL at T = 2, per k and tail mode) runs on two settings where neither holds:

  synthetic  1000 classes (`LatentClip`, bench/common.py): 8 views per image share the image's class
             structure; the students are other models of the same images, with a low-rank distortion
             of image and class embeddings (the same for every image) plus an error per image that all
             its views share: "far" (distortion 1.0, image error 0.7) and "close" (0.3, 0.2).
  digits     real logits: the demo's tiny teacher CLIP (shipped weights) through `cache-teacher` over 8
             real views of the demo's 800 train digits (the demo's shards, crops and `--topk all`);
             students: the demo's tiny student CLIP with its text-initialised KD head, untrained and
             after 100 and 1000 steps of KD against those logits (AdamW, lr 5e-4, 64 views per step).
             10 classes, so only k < 10 means anything.

JSON: students.<setting>.<student> (top-1 agreement with the teacher, how much of the student's error
is shared by the views of one image, mean full KL); results.<setting>.<student>.<k> as in kd_fidelity.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import LatentClip, save
from kd_fidelity import T, sweep

from dho_pipeline.kd import kd_full

SYNTHETIC_STUDENTS = {"far": (1.0, 0.7), "close": (0.3, 0.2)}  # (distortion, image error)
DIGIT_STEPS = (0, 100, 1000)  # KD steps of the tiny student
BATCH = 64


def describe(teacher: torch.Tensor, student: torch.Tensor, views: int) -> dict:
    """How far a student is from the teacher, and whether its errors are shared by an image's views."""
    error = (student - teacher).double()
    error = error - error.mean(-1, keepdim=True)  # a constant shift of all logits changes nothing
    per_image = error.view(-1, views, error.shape[-1])
    shared = per_image.mean(1, keepdim=True)  # the part of the error common to an image's views
    return {"top1_agreement": (student.argmax(-1) == teacher.argmax(-1)).double().mean().item(),
            "full_kl": kd_full(student.double(), teacher.double(), T).item(),
            "error_shared_by_views": (shared.expand_as(per_image).pow(2).sum() / per_image.pow(2).sum()).item(),
            "views": views}


def synthetic(images: int, views: int) -> tuple[dict, dict]:
    model = LatentClip(images, views)
    teacher = torch.from_numpy(model.teacher_logits())
    students, results = {}, {}
    for name, (distortion, image_error) in SYNTHETIC_STUDENTS.items():
        student = torch.from_numpy(model.student_logits(distortion, image_error))
        students[name] = {"distortion": distortion, "image_error": image_error, **describe(teacher, student, views)}
        label = f"synthetic, correlated views, {name} student ({len(teacher)} views)"
        results[name] = sweep(label, teacher, student)
    teacher_top1 = (teacher.view(images, views, -1).argmax(-1) == torch.from_numpy(model.labels)[:, None]).double().mean()
    students["teacher_top1"] = teacher_top1.item()
    return students, results


# ---- the digits: real teacher logits over real views -----------------------------------------------


def digit_teacher_cache(folder: Path) -> tuple[Path, Path, dict]:
    """The demo's train shards, the tiny CLIPs' weights, and the tiny teacher's 8-view full-logit cache."""
    from dho_pipeline.demo.digits import CLASSNAMES, CROP_SCALE, TEMPLATES
    from dho_pipeline.demo.tiny_clip import expand_compact
    from dho_pipeline.stages import cache_teacher, manifest
    from dho_pipeline.stages.demo import write_digit_shards
    from dho_pipeline.stages.pretrain_demo import SHIPPED

    parts = write_digit_shards(folder)
    weights = {stem: folder / f"{stem}.safetensors" for stem in ("tiny-teacher", "tiny-student")}
    for stem, path in weights.items():
        expand_compact(SHIPPED / f"{stem}.safetensors", path)
    (folder / "classes.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (folder / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    manifest.run(manifest.Config(shards=tuple(str(p) for p in parts["train"]), out=folder / "train.json"))
    cache_teacher.run(cache_teacher.Config(
        manifest=folder / "train.json", out=folder / "teacher.zarr", teacher="dho-tiny-teacher",
        pretrained=str(weights["tiny-teacher"]), classnames=folder / "classes.txt", templates=folder / "templates.txt",
        views=8, topk=None, crop_scale=CROP_SCALE, workers=0, seed=0))
    return folder / "teacher.zarr", folder / "train.json", weights


def cached_views(cache_path: Path, manifest_path: Path):
    """Every cached view: the teacher's full logits [N * V, C] (float16, as cached), the images (PIL, one
    per sample), boxes [N, V, 4], flips [N, V] and labels [N]."""
    from dho_pipeline.cache_store import TeacherCache
    from dho_pipeline.manifest import load_manifest
    from dho_pipeline.shards import image_field, iter_shard_samples
    from dho_pipeline.views import decode_rgb

    cache, manifest = TeacherCache.open(cache_path), load_manifest(manifest_path)
    logits, images, boxes, flips, labels = [], [], [], [], []
    for index, shard in enumerate(manifest.shards):
        arrays = cache.read_shard(index, ("key", "box", "flip", "topk_index", "topk_logit"))
        full = np.zeros(arrays["topk_index"].shape, np.float32)
        np.put_along_axis(full, arrays["topk_index"].astype(np.int64), arrays["topk_logit"].astype(np.float32), axis=-1)
        decoded = {s["__key__"]: decode_rgb(s[image_field(s)]) for s in iter_shard_samples(Path(shard.path))}
        images += [decoded[key] for key in arrays["key"]]
        logits.append(full.reshape(-1, full.shape[-1]))
        boxes.append(arrays["box"])
        flips.append(arrays["flip"])
        labels.append(np.asarray(shard.labels))
    return (torch.from_numpy(np.concatenate(logits)), images, np.concatenate(boxes), np.concatenate(flips),
            np.concatenate(labels))


def student_inputs(loaded, images, boxes, flips) -> torch.Tensor:
    """Each cached view rendered for the student (its own size, the teacher's box and flip), normalised."""
    from dho_pipeline.pixels import Normalizer
    from dho_pipeline.views import render_view

    size = loaded.preprocess.image_size
    pixels = np.stack([render_view(image, box, flip, size)
                       for image, image_boxes, image_flips in zip(images, boxes, flips)
                       for box, flip in zip(image_boxes, image_flips)])
    normalize = Normalizer(loaded.preprocess.mean, loaded.preprocess.std, torch.device("cpu"))
    return normalize(torch.from_numpy(pixels)).contiguous()


def kd_logits(student, inputs: torch.Tensor) -> torch.Tensor:
    student.eval()
    with torch.no_grad():
        return torch.cat([student(part)[1] for part in inputs.split(512)])


def digit_students(weights: Path, inputs: torch.Tensor, teacher: torch.Tensor) -> dict[int, torch.Tensor]:
    """The tiny student's KD-head logits on every view after each of DIGIT_STEPS steps of KD training."""
    from dho_pipeline.clip_models import load_clip
    from dho_pipeline.demo.digits import CLASSNAMES, TEMPLATES
    from dho_pipeline.student import build_student

    student = build_student(load_clip("dho-tiny-student", str(weights)), CLASSNAMES, TEMPLATES)
    optimizer = torch.optim.AdamW(student.parameters(), lr=5e-4, weight_decay=0.05)
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(0))
    snapshots, step = {}, 0
    while True:
        if step in DIGIT_STEPS:
            snapshots[step] = kd_logits(student, inputs)
        if step == max(DIGIT_STEPS):
            return snapshots
        batch = order[(step * BATCH) % len(order):][:BATCH]
        student.train()
        loss = kd_full(student(inputs[batch])[1], teacher[batch], T)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1


def digits(folder: Path) -> tuple[dict, dict]:
    from dho_pipeline.clip_models import load_clip

    cache, manifest, weights = digit_teacher_cache(folder)
    teacher, images, boxes, flips, labels = cached_views(cache, manifest)
    views = boxes.shape[1]
    loaded = load_clip("dho-tiny-student", str(weights["tiny-student"]))
    inputs = student_inputs(loaded, images, boxes, flips)
    label_per_view = torch.from_numpy(labels).repeat_interleave(views)
    students = {"teacher_top1": (teacher.argmax(-1) == label_per_view).double().mean().item()}
    results = {}
    for steps, logits in digit_students(weights["tiny-student"], inputs, teacher).items():
        name = f"steps{steps}"
        students[name] = {"kd_steps": steps, "top1": (logits.argmax(-1) == label_per_view).double().mean().item(),
                          **describe(teacher, logits, views)}
        label = f"digits, tiny teacher, tiny student after {steps} KD steps ({len(teacher)} views)"
        results[name] = sweep(label, teacher, logits, ks=[1, 2, 3, 5])
    return students, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=250, help="synthetic images (8 views each)")
    args = parser.parse_args()
    torch.manual_seed(0)
    students, results = {}, {}
    students["synthetic"], results["synthetic"] = synthetic(args.images, 8)
    with tempfile.TemporaryDirectory() as scratch:
        students["digits"], results["digits"] = digits(Path(scratch))
    for setting, described in students.items():
        print(f"\n{setting}: " + "; ".join(f"{name} {value}" for name, value in described.items()))
    save("kd_correlated", {"temperature": T, "synthetic_images": args.images, "views": 8,
                           "digit_kd_steps": list(DIGIT_STEPS), "students": students, "results": results})


if __name__ == "__main__":
    main()
