"""How far each of our settings is from the DHO reference's: the figures of docs/fidelity.md.

    .venv/bin/python bench/fidelity.py [--tower-classes 20] [--skip-tower]

Prints, and saves as JSON (bench-out/fidelity.json, or $BENCH_OUT):

- split: the reference's labeled set and ours (`--rule balanced`) on an ImageNet-1k-sized folder tree
  (1,281,167 file names in 1000 class folders; the class sizes are made up, 732..1300 each, because no
  public per-class list was found: the counts depend on N and C only, the drawn images on every size),
  with the manifest order `dho-pipeline shard` gives (its seeded shuffle): totals, per-class counts,
  overlap;
- steps per epoch and in all (32 epochs, 256 + 256 per step, 8 processes) under both roundings, with and
  without 5 held-out images per class;
- lr schedule: the reference's against ours over the 1% and 10% runs: largest gap, and the lr integral
  as a share of base lr x steps;
- views: grey-level differences (0..255) between our evaluation view and the reference's chain, and
  between one-resize and two-resize training views, on two photographs (scikit-learn's) and ImageNet-like
  500 x 375 JPEGs;
- view 0's share of training views at V cached views;
- class embeddings: the norm of the mean of the 7 templates' unit text embeddings (the factor by which the
  reference's DFN5B logits are ours) on the ViT-H-14-378 text tower with random weights (the DFN5B weights
  are not available here), for the first `--tower-classes` ImageNet classes.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from common import save

IMAGENET_TRAIN = 1_281_167
CLASSES = 1000


# ---- split ------------------------------------------------------------------------------------------


def imagenet_like_sources(seed: int = 0) -> tuple[list[str], np.ndarray]:
    """File names `wnid/wnid_<n>.JPEG` of a made-up ImageNet-sized tree and their class sizes."""
    from dho_pipeline.package_data import IMAGENET_WNIDS
    from dho_pipeline.prompts import read_lines

    wnids = read_lines(IMAGENET_WNIDS, "wnids")
    rng = np.random.default_rng(seed)
    sizes = rng.integers(732, 1301, CLASSES)
    while sizes.sum() != IMAGENET_TRAIN:  # nudge within 732..1300 until the total is ImageNet's
        step = int(np.sign(IMAGENET_TRAIN - sizes.sum()))
        movable = np.flatnonzero((sizes + step >= 732) & (sizes + step <= 1300))
        sizes[rng.choice(movable, min(len(movable), abs(IMAGENET_TRAIN - int(sizes.sum()))), replace=False)] += step
    sources = []
    for wnid, size in zip(wnids, sizes):
        numbers = rng.choice(60000, size, replace=False)
        sources.extend(f"{wnid}/{wnid}_{n}.JPEG" for n in numbers)
    return sources, sizes


def split_figures() -> dict:
    from dho_pipeline.split import _balanced_labeled_ids, reference_class_counts, reference_draw

    started = time.perf_counter()
    sources, sizes = imagenet_like_sources()
    # Manifest order as `shard` writes it: the sorted file list, shuffled with seed 0.
    on_disk = sorted(range(len(sources)), key=lambda i: sources[i])
    manifest_order = [on_disk[i] for i in np.random.default_rng(0).permutation(len(sources))]
    position = np.empty(len(sources), np.int64)
    position[manifest_order] = np.arange(len(sources))
    labels_by_source = np.repeat(np.arange(CLASSES), sizes)
    labels = labels_by_source[manifest_order]
    figures = {"images": len(sources), "classes": CLASSES}
    reference_sets = {}
    for percent in (1.0, 10.0):
        counts = reference_class_counts(sizes, percent)
        reference = set(position[reference_draw(sources, percent, 13)].tolist())
        ours = set(_balanced_labeled_ids(labels, np.arange(CLASSES), percent, np.random.default_rng(13)).tolist())
        reference_sets[percent] = reference
        figures[f"{percent:g}%"] = {
            "reference_total": len(reference), "balanced_total": len(ours),
            "reference_per_class": {str(k): int(v) for k, v in zip(*np.unique(counts, return_counts=True))},
            "balanced_per_class": round(percent / 100 * len(sources) / CLASSES),
            "overlap_images": len(reference & ours), "overlap_share_of_reference": len(reference & ours) / len(reference),
        }
    figures["reference_1%_inside_10%"] = reference_sets[1.0] <= reference_sets[10.0]
    figures["seconds"] = round(time.perf_counter() - started, 1)
    return figures


# ---- steps and lr -----------------------------------------------------------------------------------


def step_figures() -> dict:
    from dho_pipeline.schedule import StepPlan

    figures = {}
    for percent, labeled in ((1, 13_000), (10, 128_286)):
        for holdout in (0, 5):
            unlabeled = IMAGENET_TRAIN - labeled - holdout * CLASSES
            row = {"unlabeled": unlabeled}
            for rounding in ("floor", "reference"):
                plan = StepPlan.of(num_unlabeled=unlabeled, batch_size=256, epochs=32, rounding=rounding, world=8)
                row[rounding] = {"steps_per_epoch": plan.steps_per_epoch, "total": plan.total_steps}
            figures[f"{percent}% holdout {holdout}"] = row
    return figures


def lr_figures() -> dict:
    from dho_pipeline.schedule import reference_warmup_cosine, warmup_cosine

    figures = {}
    for name, total in (("1%", 158_528), ("10%", 144_128)):  # the reference's step totals
        steps = range(total)
        reference = np.array([reference_warmup_cosine(i, base_lr=1.0, warmup_steps=5000, total_steps=total) for i in steps])
        ours = np.array([warmup_cosine(i, base_lr=1.0, warmup_steps=5000, total_steps=total) for i in steps])
        gap = np.abs(reference - ours)
        figures[name] = {
            "total_steps": total,
            "max_gap_share_of_base_lr": float(gap.max()), "step_of_max_gap": int(gap.argmax()),
            "integral_share_reference": float(reference.mean()), "integral_share_ours": float(ours.mean()),
            "reference_peak": float(reference.max()), "reference_last_step": float(reference[-1]),
            "reference_over_last_5000_steps_share": float(reference[-5000:].sum() / reference.sum()),
        }
    return figures


# ---- views ------------------------------------------------------------------------------------------


def test_images() -> dict:
    """Two photographs (scikit-learn ships them, 640 x 427) and ImageNet-like 500 x 375 JPEGs."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    images = {name: Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")}
    rng = np.random.default_rng(0)
    for index in range(6):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        noise = rng.integers(-12, 12, (375, 500, 3))
        array = np.asarray(Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC), dtype=np.int64)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(array + noise, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        images[f"synthetic-{index}.jpg"] = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return images


def _difference(pairs) -> dict:
    gaps = np.concatenate([np.abs(a.astype(np.int64) - b.astype(np.int64)).ravel() for a, b in pairs])
    return {"mean_grey_levels": float(gaps.mean()), "max_grey_levels": int(gaps.max()),
            "share_of_values_differing": float((gaps > 0).mean())}


def view_figures() -> dict:
    from dho_pipeline.views import VIEW0_WHOLE, ViewPolicy, center_box, draw_view, render_reference_eval, render_view

    images = test_images()
    figures = {"images": {name: list(image.size) for name, image in images.items()}}
    photos = {k: v for k, v in images.items() if not k.startswith("synthetic")}
    for subset, chosen in (("photos", photos), ("all", images)):
        evaluation = [(render_view(image, center_box(*image.size), False, (224, 224)), render_reference_eval(image, (224, 224)))
                      for image in chosen.values()]
        policy = ViewPolicy(num_views=9, seed=0, view0=VIEW0_WHOLE)
        training = []
        for name, image in chosen.items():
            for view in range(1, 9):
                box, flip = draw_view(policy, "bench.tar", name, view, *image.size)
                training.append((render_view(image, box, flip, (224, 224)),
                                 render_view(image, box, flip, (224, 224), via=(378, 378))))
        figures[subset] = {"eval_view": _difference(evaluation), "training_view": _difference(training),
                           "training_views_compared": len(training)}
    return figures


def view0_figures() -> dict:
    return {f"{views} views": {"ours_all": 1 / views, "reference": 0.0} for views in (1, 8, 32, 33)}


# ---- class embeddings -------------------------------------------------------------------------------


def tower_figures(classes: int) -> dict:
    import torch
    import torch.nn.functional as F

    from dho_pipeline.clip_models import load_clip
    from dho_pipeline.package_data import IMAGENET_CLASSNAMES, IMAGENET_TEMPLATES
    from dho_pipeline.prompts import fill_template, read_classnames, read_templates

    started = time.perf_counter()
    names = read_classnames(IMAGENET_CLASSNAMES)[:classes]
    templates = read_templates(IMAGENET_TEMPLATES)
    clip = load_clip("ViT-H-14-378-quickgelu", "none")
    with torch.no_grad():
        texts = [fill_template(t, c) for c in names for t in templates]
        embeddings = torch.cat([clip.model.encode_text(clip.tokenizer(texts[i:i + 35])).float()
                                for i in range(0, len(texts), 35)])
        unit = F.normalize(embeddings, dim=-1).view(len(names), len(templates), -1)
        norms = unit.mean(1).norm(dim=-1).numpy()
        # The teacher's logits per class: ours 100 * cos; the reference's 100 * cos * norm. Top-1 changes?
        images = F.normalize(torch.randn(256, unit.shape[-1], generator=torch.Generator().manual_seed(0)), dim=-1)
        ours = 100 * images @ F.normalize(unit.mean(1), dim=-1).T
        reference = 100 * images @ unit.mean(1).T
    return {
        "tower": "ViT-H-14-378-quickgelu text tower, random weights (seed 0)", "classes": len(names),
        "templates": len(templates),
        "mean_norm_min": float(norms.min()), "mean_norm_mean": float(norms.mean()), "mean_norm_max": float(norms.max()),
        "top1_agreement_on_random_unit_features": float((ours.argmax(1) == reference.argmax(1)).float().mean()),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tower-classes", type=int, default=20, help="ImageNet classes to embed with the ViT-H tower")
    parser.add_argument("--skip-tower", action="store_true", help="skip the ViT-H text-tower measurement (minutes on a CPU)")
    args = parser.parse_args()
    figures = {"steps": step_figures(), "lr": lr_figures(), "views": view_figures(), "view0": view0_figures(),
               "split": split_figures()}
    if not args.skip_tower:
        figures["class_embeddings"] = tower_figures(args.tower_classes)
    print_figures(figures)
    save("fidelity", figures)


def print_figures(figures: dict) -> None:
    split = figures["split"]
    print("split (ImageNet-sized tree, made-up class sizes):")
    for percent in ("1%", "10%"):
        row = split[percent]
        print(f"  {percent}: reference {row['reference_total']:,} {row['reference_per_class']}, balanced "
              f"{row['balanced_total']:,} ({row['balanced_per_class']} per class); overlap {row['overlap_images']:,} "
              f"= {100 * row['overlap_share_of_reference']:.1f}% of the reference's")
    print(f"  reference 1% inside its 10%: {split['reference_1%_inside_10%']}")
    print("steps (8 processes, 256 + 256 per step, 32 epochs):")
    for name, row in figures["steps"].items():
        print(f"  {name}: N_u {row['unlabeled']:,}; floor {row['floor']['steps_per_epoch']:,}/epoch "
              f"{row['floor']['total']:,}; reference {row['reference']['steps_per_epoch']:,}/epoch {row['reference']['total']:,}")
    print("lr schedule (base lr = 1):")
    for name, row in figures["lr"].items():
        print(f"  {name} ({row['total_steps']:,} steps): largest gap {row['max_gap_share_of_base_lr']:.4f} at step "
              f"{row['step_of_max_gap']:,}; integral reference {row['integral_share_reference']:.4f}, ours "
              f"{row['integral_share_ours']:.4f}; reference peak {row['reference_peak']:.5f}, last step "
              f"{row['reference_last_step']:.2e}, last 5000 steps {100 * row['reference_over_last_5000_steps_share']:.3f}% of its integral")
    print("views (grey levels 0..255, 224 px):")
    for subset in ("photos", "all"):
        row = figures["views"][subset]
        for kind in ("eval_view", "training_view"):
            d = row[kind]
            print(f"  {subset:<6} {kind:<13}: mean {d['mean_grey_levels']:.2f}, max {d['max_grey_levels']}, "
                  f"{100 * d['share_of_values_differing']:.1f}% of values differ")
    print("view 0 share of training views (ours, all views): " +
          ", ".join(f"{k} {100 * v['ours_all']:.1f}%" for k, v in figures["view0"].items()))
    if "class_embeddings" in figures:
        row = figures["class_embeddings"]
        print(f"class embeddings ({row['tower']}, {row['classes']} classes x {row['templates']} templates): norm of "
              f"the template mean {row['mean_norm_min']:.3f}..{row['mean_norm_max']:.3f} (mean {row['mean_norm_mean']:.3f}); "
              f"top-1 agreement on random features {100 * row['top1_agreement_on_random_unit_features']:.1f}%")


if __name__ == "__main__":
    main()
