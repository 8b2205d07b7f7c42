"""Config fields that several stages declare alike, written once: the student's architecture, the
mix's alpha and beta, the device, precision, evaluation view and shard check each mean the same thing
wherever they appear."""

from __future__ import annotations

from dho_pipeline.hashing import FILE_CHECKS
from dho_pipeline.views import EVAL_VIEWS

from .common import PRECISIONS
from .options import setting


def student_setting():
    return setting(None, help="Architecture when the checkpoint does not record it: ViT-B-16, ViT-L-14, "
                              "ViT-L-14-336px, RN50, or an open_clip name.")


def alpha_setting():
    return setting(None, default_text="the checkpoint's", help="Weight of the CE head in the mix.")


def beta_setting():
    return setting(None, default_text="the checkpoint's", help="Temperature of the KD head in the mix.")


def device_setting(default_text: str = "this process's GPU, else cpu"):
    return setting(None, default_text=default_text, help="Device, e.g. cuda, cuda:1, cpu.")


def precision_setting(help: str = "Autocast precision."):
    return setting(None, choices=PRECISIONS, default_text="bf16 on GPU, fp32 on CPU", help=help)


def eval_view_setting(whose: str = "Each image's view"):
    return setting("center-square", choices=EVAL_VIEWS,
                   help=f"{whose}: the centred square, one bicubic resize; or 'reference': Resize(378) bilinear, "
                        "CenterCrop(378), Resize bicubic (docs/fidelity.md).")


def verify_shards_setting():
    return setting("quick", choices=FILE_CHECKS,
                   help="Check each shard against the manifest first: quick (size, 16 sampled blocks) or full "
                        "(sha256 of every byte).")
