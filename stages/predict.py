"""Classify images with a student: the model card's inference path.

    dho-pipeline predict --checkpoint vit_b_10.pt photo.jpg [more.png ...] [--topk 5] [--json]
    dho-pipeline predict --checkpoint b16-dho/ photos/ 'more/*.jpg' --output results.csv   # or results.jsonl

IMAGES are files, folders (every image below them, sorted) and glob patterns. Each image: resize the shortest
side and centre-crop to the student's input (bicubic; a timm student's crop_pct), the student's mean/std, both
heads, combined with the student's alpha and beta. Images go through in batches with a progress bar (on a terminal). `--output` writes one line
(JSONL) or row (CSV) per image, whole or not at all.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from dho_pipeline.errors import UserError

from .shared_settings import device_setting, student_setting
from .options import setting

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
OUTPUT_SUFFIXES = (".jsonl", ".csv")


@dataclass(frozen=True, kw_only=True)
class Config:
    checkpoint: Path = setting(help="Student: a checkpoint (ours or a released one), an open_clip export folder, "
                                    "or a .safetensors export with its .json.")
    images: tuple[str, ...] = setting(argument=True, help="Image files, folders and glob patterns.")
    topk: int = setting(5, help="Classes kept per image.")
    output: Path | None = setting(None, help="Write the predictions to this .jsonl or .csv file.")
    batch_size: int = setting(32, help="Images per batch.")
    on_error: str = setting("fail", choices=("fail", "skip"),
                            help="An image that cannot be decoded: stop, or record it as an error and go on.")
    student: str | None = student_setting()
    classnames: Path | None = setting(None, default_text="the checkpoint's, or ImageNet's for 1000 classes",
                                      help="Class names, one per line.")
    device: str | None = device_setting("cuda if available, else cpu")

    def __post_init__(self):
        if self.output is not None and Path(self.output).suffix.lower() not in OUTPUT_SUFFIXES:
            raise UserError(f"--output {self.output}: write a .jsonl or a .csv file")
        if self.topk < 1:
            raise UserError(f"--topk must be a positive number of classes, not {self.topk}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be positive, not {self.batch_size}")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def expand_images(arguments) -> list[Path]:
    """Files as given; folders as every image file below them, sorted; glob patterns expanded (sorted)."""
    found: list[Path] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and _is_image(p))
            if not inside:
                raise UserError(f"folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            found += inside
        elif path.exists():
            found.append(path)
        elif glob.has_magic(str(argument)):
            matches = sorted(Path(p) for p in glob.glob(str(argument), recursive=True))
            matches = [p for p in matches if p.is_file() and _is_image(p)]
            if not matches:
                raise UserError(f"pattern {argument!r} matches no image files")
            found += matches
        else:
            raise UserError(f"image {path} does not exist")
    if not found:
        raise UserError("no images given; name files, folders or glob patterns")
    return found


def _decode(path: Path):
    from dho_pipeline.views import decode_rgb, describe_decode_error

    try:
        data = path.read_bytes()
    except OSError as error:
        return None, f"cannot be read ({error.strerror or error})"
    try:
        return decode_rgb(data), None
    except Exception as error:  # PIL raises many types for bad bytes
        return None, f"cannot be decoded ({describe_decode_error(error)})"


class _Writer:
    """The --output file: written under a temporary name, renamed when every image is in."""

    def __init__(self, path: Path | None, topk: int):
        self.path, self.topk = path, topk
        self.handle = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            self.handle = open(self.temporary, "w", encoding="utf-8", newline="")
            self.csv = csv.writer(self.handle) if path.suffix.lower() == ".csv" else None
            if self.csv is not None:
                ranks = [f"{field}_{r}" for r in range(1, topk + 1) for field in ("class", "name", "probability")]
                self.csv.writerow(["image", *ranks, "error"])

    def write(self, result: dict) -> None:
        if self.handle is None:
            return
        if self.csv is None:
            self.handle.write(json.dumps(result) + "\n")
            return
        cells = [v for p in result.get("predictions", []) for v in (p["class"], p["name"], f"{p['probability']:.6g}")]
        cells += [""] * (3 * self.topk - len(cells))
        self.csv.writerow([result["image"], *cells, result.get("error", "")])

    def close(self, complete: bool) -> None:
        if self.handle is None:
            return
        self.handle.close()
        if complete:
            os.replace(self.temporary, self.path)
        else:
            self.temporary.unlink(missing_ok=True)


def run(config: Config) -> list[dict]:
    import torch

    from dho_pipeline.classifier import classifier_of
    from dho_pipeline.progress import progress
    from dho_pipeline.prompts import read_classnames
    from dho_pipeline.student_checkpoint import load_student

    paths = expand_images(config.images)
    classnames = read_classnames(config.classnames) if config.classnames else None
    classifier = classifier_of(load_student(config.checkpoint, student=config.student, classnames=classnames))
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    classifier.to(device)
    k = min(config.topk, len(classifier.classnames))
    results: list[dict] = []
    writer = _Writer(Path(config.output) if config.output else None, k)
    complete = False
    try:
        with progress(total=len(paths), unit="img", desc="predict") as bar:  # on a terminal only, off with --quiet
            for start in range(0, len(paths), config.batch_size):
                batch = paths[start : start + config.batch_size]
                for result in _predict_batch(classifier, batch, k, config.on_error, device):
                    writer.write(result)
                    results.append(result)
                bar.update(len(batch))
        complete = True
    finally:
        writer.close(complete)
    return results


def _predict_batch(classifier, paths: list[Path], k: int, on_error: str, device) -> list[dict]:
    import numpy as np
    import torch

    decoded, errors = [], {}
    for path in paths:
        image, error = _decode(path)
        if error is None:
            decoded.append((path, classifier.preprocess.pixels(image)))
        elif on_error == "skip":
            errors[path] = error
        else:
            raise UserError(f"image {path} {error}; pass --on-error skip to record it and go on")
    probabilities = {}
    if decoded:
        pixels = torch.from_numpy(np.stack([p for _, p in decoded]))
        with torch.no_grad():
            rows = classifier(classifier.preprocess.normalize(pixels.to(device))).cpu()  # uint8 travels
        probabilities = {path: row for (path, _), row in zip(decoded, rows)}
    results = []
    for path in paths:
        if path in errors:
            results.append({"image": str(path), "error": errors[path]})
            continue
        top = probabilities[path].topk(k)
        results.append({"image": str(path), "predictions": [
            {"class": int(i), "name": classifier.classnames[int(i)], "probability": float(p)}
            for p, i in zip(top.values, top.indices)
        ]})
    return results


def format_results(results: list[dict]) -> str:
    out = io.StringIO()
    for result in results:
        out.write(f"{result['image']}\n")
        if "error" in result:
            out.write(f"  error: {result['error']}\n")
        for p in result.get("predictions", []):
            out.write(f"  {p['class']:>5}  {p['probability']:7.4f}  {p['name']}\n")
    return out.getvalue().rstrip("\n")
