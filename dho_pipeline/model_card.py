"""The model card (README.md) of an exported student: what it is, what taught it, on what, how well.

Facts come from the checkpoint's metadata (architecture, training config, fingerprints, labeled images,
calibration), the files the run left (the teacher cache's spec, the split, `<checkpoint>.calibration.json`)
where they are still at hand, and an evaluation report (`evaluate --json`) if one is given. What is not
known is said to be unknown, never guessed.
"""

from __future__ import annotations

import json
from pathlib import Path

from .student import inference

HEADS = (("ce", "CE head"), ("kd", "KD head"), ("mix", "mix (alpha, beta)"))


def _teacher(config: dict) -> str:
    if config.get("teacher_online"):
        return f"`{config.get('teacher')}` / `{config.get('teacher_pretrained')}`, run online during training"
    cache = config.get("cache")
    if not cache:
        return "unknown"
    try:
        from .cache_store import TeacherCache

        spec = TeacherCache.open(cache).spec
    except Exception:  # the cache stayed on the training machine
        return f"from the teacher cache `{cache}` (not at hand when exporting; its spec is unknown here)"
    teacher = spec.teacher
    return (f"`{teacher.get('model')}` / `{teacher.get('pretrained')}` (weights {teacher.get('weights_fingerprint', '?')[:23]}), "
            f"cached once: {spec.num_views} view(s) per image, top-{'all' if spec.full_logits else spec.topk} logits")


def _split(config: dict, metadata) -> list[str]:
    lines = [f"- labeled images: {len(metadata.labeled_keys)}"]
    path = config.get("split")
    try:
        from .split import load_split

        split = load_split(path)
    except Exception:
        return lines + [f"- split: `{path}` (not at hand; fingerprint `{metadata.split_fingerprint}`)"]
    method = split.method
    budget = (f"{method['percent']:g}% labels" if method.get("percent") is not None else
              f"{method['shots']} per class" if method.get("shots") is not None else f"list {method.get('from_list')}")
    return [f"- label budget: {budget}, seed {method.get('seed')}: {split.num_labeled} labeled, "
            f"{split.num_holdout} held out (calibration), {split.num_unlabeled} unlabeled",
            f"- split fingerprint: `{split.fingerprint}`"]


def _metrics_table(report: dict) -> list[str]:
    lines = ["| head | top-1 | top-5 | NLL | ECE |", "|---|---|---|---|---|"]
    for head, label in HEADS:
        r = report.get(head, {})
        cells = [f"{100 * r['top1']:.2f}%" if "top1" in r else "", f"{100 * r['top5']:.2f}%" if "top5" in r else "",
                 f"{r['nll']:.3f}" if "nll" in r else "", f"{r['ece']:.3f}" if "ece" in r else ""]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _calibration(checkpoint_path: Path, checkpoint) -> list[str]:
    calibrated = checkpoint.metadata.calibrated_on if checkpoint.metadata else None
    head = f"alpha = {checkpoint.alpha:g}, beta = {checkpoint.beta:g}"
    if not calibrated:
        return [f"{head}: not calibrated (the paper's fixed mix is alpha = beta = 0.5)."]
    lines = [f"{head}, chosen by `dho-pipeline calibrate` on {calibrated.get('samples')} held-out images "
             f"(data {', '.join(map(str, calibrated.get('data', [])))}"
             + (f", split `{calibrated['split']}`" if calibrated.get("split") else "") + "; "
             f"{calibrated.get('overlap_with_training_labels', 0)} of them were training labels)."]
    report_path = Path(f"{checkpoint_path}.calibration.json")
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        per_head = {h: {"top1": report["accuracy"][h], "nll": report["nll"][h], "ece": report["ece"][h]}
                    for h in ("ce", "kd", "mix")}
        lines += ["", "On those held-out images:", "", *_metrics_table(per_head),
                  "", f"(alpha = beta = 0.5 there: {100 * report['paper_setting']['accuracy']:.2f}% top-1)"]
    return lines


def model_card(*, name: str, checkpoint_path: Path, checkpoint, architecture: str, text_tower: dict,
               evaluation: dict | None) -> str:
    """README.md for the open_clip export folder (Hugging Face front matter included)."""
    metadata = checkpoint.metadata
    config = metadata.config if metadata else {}
    classnames = metadata.classnames if metadata else []
    released = not config or "source" in config
    lines = [
        "---", "library_name: open_clip", "pipeline_tag: image-classification",
        "tags: [clip, image-classification, knowledge-distillation, dho, dho-pipeline]", "---", "",
        f"# {name}", "",
        f"A dual-head CLIP image classifier ({len(classnames)} classes) distilled with "
        "[dho-pipeline](https://arxiv.org/abs/2505.07675) (DHO: dual-head optimisation). The image tower is "
        f"`{metadata.model if metadata else architecture}` (started from `{metadata.pretrained if metadata else '?'}`); "
        "two linear heads sit on its features:", "",
        f"    {inference(metadata.head if metadata else 'cosine')}", "",
        "## Files", "",
        "- `open_clip_config.json`, `open_clip_model.safetensors`: an open_clip CLIP whose image tower (`visual.*`) is "
        "the student's. open_clip loads only whole CLIPs, so the text tower is included: "
        f"`{text_tower['model']}` with weights `{text_tower['weights']}` (the student never trained it"
        + ("; randomly initialised here, so this CLIP's zero-shot text side means nothing" if text_tower["weights"] == "none"
           else "") + ").",
        "- `dho_heads.safetensors`: `ce_head.*`, `kd_head.*`.",
        "- `dho_student.json`: alpha, beta, class names, preprocessing and the training record; `classnames.txt`.", "",
        "## Use", "",
        "```python",
        "from PIL import Image",
        "from dho_pipeline import load_student   # pip install dho-pipeline",
        "",
        "student = load_student(\"FOLDER\")         # this folder, e.g. from `hf download REPO --local-dir FOLDER`",
        "probabilities = student.predict([Image.open(\"photo.jpg\")])",
        "print(student.top(probabilities, k=5))",
        "```", "",
        "The image tower alone, with open_clip:", "",
        "```python",
        "import open_clip",
        "model, _, preprocess = open_clip.create_model_and_transforms(\"local-dir:FOLDER\")",
        "features = model.encode_image(preprocess(image)[None])   # the student's features f",
        "```", "",
        "Or from the command line: `dho-pipeline predict --checkpoint FOLDER photos/ --output results.csv`.", "",
    ]
    p = metadata.preprocess if metadata else None
    if p is not None:
        view = f"resize the shortest side to {p.image_size[0]} and centre-crop to" if p.crop_fraction == 1 else \
            f"take the centred square of {p.crop_fraction:g} of the shorter side and resize it to"
        lines += [f"Preprocessing: {view} {p.image_size[0]}x{p.image_size[1]} ({p.interpolation}), mean {list(p.mean)}, "
                  f"std {list(p.std)}.", ""]
    lines += ["## Training", ""]
    if released:
        lines += [f"Exported from {config.get('source', 'a checkpoint without training record')}: the teacher, data "
                  "and training settings are not recorded in it.", ""]
    else:
        lines += [
            f"- teacher: {_teacher(config)}",
            f"- data: manifest `{config.get('manifest')}` (fingerprint `{metadata.manifest_fingerprint}`)",
            *_split(config, metadata),
            f"- objective `{config.get('objective')}` (KD at T = {config.get('temperature')}, tail "
            f"`{config.get('tail')}`, loss weights {config.get('loss_weights')}), {config.get('epochs')} epochs, batch "
            f"{config.get('batch_size')} + {config.get('batch_size')}, lr {config.get('lr')}, seed {config.get('seed')}",
            f"- steps: {metadata.steps}" + ("" if metadata.finished else " (the run did not finish)"),
            f"- teacher cache fingerprint: `{metadata.cache_fingerprint}`" if metadata.cache_fingerprint else
            "- no teacher cache (teacher online)", "",
        ]
    lines += ["## Evaluation", ""]
    if evaluation:
        lines += [f"On {evaluation.get('samples')} images of {', '.join(map(str, evaluation.get('data', []))) or 'the evaluation data'}"
                  f" (alpha {evaluation.get('alpha', checkpoint.alpha):g}, beta {evaluation.get('beta', checkpoint.beta):g}):", "",
                  *_metrics_table(evaluation), ""]
    else:
        lines += ["Not evaluated at export. `dho-pipeline evaluate --checkpoint FOLDER --data TEST.json` reports "
                  "top-1/top-5, NLL and ECE of each head and the mix.", ""]
    lines += ["## Calibration", "", *_calibration(checkpoint_path, checkpoint), ""]
    lines += ["## Classes", "", ", ".join(classnames[:50]) + (f", ... ({len(classnames)} in all, `classnames.txt`)"
                                                             if len(classnames) > 50 else ""), ""]
    return "\n".join(lines)
