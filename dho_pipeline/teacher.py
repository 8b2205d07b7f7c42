"""The zero-shot CLIP teacher and the compact summary of its logits that the cache stores.

Teacher logits are `100 * cos(image embedding, class embedding)` over template-averaged class
embeddings, as in the DHO paper (a fixed 100, not the model's learned logit scale). `class_embeddings`
"reference" reproduces the reference's DFN5B path instead (train_imgnet_semi.py: the mean of the
per-template unit embeddings is not renormalised, so each class's logits are scaled by that mean's
norm, below 1; docs/fidelity.md).

Per view the cache keeps the top-k logits and the exact log-partition function
`log sum_c exp(z_c / T)` of the *full* logit vector at each temperature T it was asked for. From those,
the teacher's top-k probabilities at T are exact, `exp(z_i / T - logZ_T)`, and so is the mass outside
the top-k, `1 - sum_i exp(z_i / T - logZ_T)`: nothing is renormalised onto the top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cache_store import CLASS_EMBEDDINGS
from .clip_models import Preprocess
from .errors import UserError

LOGIT_SCALE = 100.0


class ZeroShotTeacher(torch.nn.Module):
    """A CLIP image tower plus a fixed zero-shot classifier; images in, class logits out."""

    def __init__(self, visual: torch.nn.Module, class_embeddings: torch.Tensor, logit_scale: float = LOGIT_SCALE,
                 renormalize: bool = True):
        super().__init__()
        self.visual = visual
        embeddings = class_embeddings.float()
        self.register_buffer("class_embeddings", F.normalize(embeddings, dim=-1) if renormalize else embeddings)
        self.logit_scale = logit_scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Images arrive in fp32; a tower cast to bf16/fp16 (TeacherRunner) takes them in its own dtype.
        features = self.visual(images.to(next(self.visual.parameters()).dtype))
        # The classifier runs in fp32 whatever the tower ran in (autocast off: under bf16 autocast
        # the matmul would round the logits to bf16): logits and log-partitions are stored as exact
        # as the embeddings allow.
        with torch.autocast(features.device.type, enabled=False):
            features = F.normalize(features.float(), dim=-1)
            return self.logit_scale * features @ self.class_embeddings.T


class TeacherRunner:
    """Runs a ZeroShotTeacher for inference as fast as the device allows.

    Measured on an H100 with ViT-H-14-378 (BENCHMARKS.md, GPU): tower weights cast to bf16 run 1.33x
    faster than fp32 weights under bf16 autocast (no per-call weight casts), and `torch.compile` adds
    1.11x (fused GELU/residual/LayerNorm). Compiled, every call is padded to one fixed batch size, so a
    shard's short last batch never makes the graph recompile. Logits come back in fp32, `[n, classes]`.
    """

    def __init__(self, teacher: ZeroShotTeacher, *, dtype: torch.dtype = torch.float32, compile: bool = False,
                 batch_size: int | None = None):
        if compile and not batch_size:
            raise ValueError("a compiled teacher needs its fixed batch_size")
        self.teacher = teacher.eval()
        self.teacher.visual.to(dtype)  # the classifier buffer stays fp32
        self.batch_size = batch_size if compile else None
        self.model = torch.compile(self.teacher, dynamic=False) if compile else self.teacher

    # no_grad, not inference_mode: a batch padded in inference mode would be an inference tensor where
    # full batches are not, and the compiled graph would be compiled a second time for it.
    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        count = images.shape[0]
        if self.batch_size is not None:
            if count > self.batch_size:
                return torch.cat([self(part) for part in images.split(self.batch_size)])
            # One memory layout for full and padded batches alike (pixels arrive channels-last from
            # HWC uint8): a compiled graph guards on strides and would compile again for the other.
            images = images.contiguous()
            if count < self.batch_size:
                images = torch.cat([images, images.new_zeros(self.batch_size - count, *images.shape[1:])])
        return self.model(images)[:count]


def summarize_logits(logits: torch.Tensor, k: int, temperatures: list[float]):
    """Top-k (sorted, descending) and per-temperature log-partitions of a [B, C] fp32 logit batch.

    Returns (indices [B, k] int64, values [B, k] fp32, log_partition [B, len(temperatures)] fp32).
    """
    values, indices = logits.topk(k, dim=-1, sorted=True)
    log_partition = torch.stack([torch.logsumexp(logits / t, dim=-1) for t in temperatures], dim=-1)
    return indices, values, log_partition


@dataclass
class LoadedTeacher:
    """A zero-shot teacher ready to run, with what a cache records about it."""

    runner: TeacherRunner
    preprocess: Preprocess  # its input size and how an image is brought to it
    description: dict  # {"model", "pretrained", "weights_fingerprint"}


def load_zero_shot_teacher(model: str, pretrained: str, classnames: list[str], templates: list[str], *,
                           device, dtype: torch.dtype = torch.float32, compile: bool = False,
                           batch_size: int | None = None, resize: str | None = None,
                           class_embeddings: str = "unit") -> LoadedTeacher:
    """An open_clip model as a zero-shot classifier on `device`: its image tower plus the class embeddings
    of `classnames` x `templates` (normalised per template, averaged, and renormalised unless
    `class_embeddings` is "reference"). The text tower is dropped once the embeddings exist. Used by
    cache-teacher and by train's online-teacher mode alike."""
    from .clip_models import class_text_embeddings, load_clip

    if class_embeddings not in CLASS_EMBEDDINGS:
        raise UserError(f"class embeddings must be one of {', '.join(CLASS_EMBEDDINGS)}, not {class_embeddings!r}")
    renormalize = class_embeddings == "unit"
    loaded = load_clip(model, pretrained, resize=resize)
    embeddings = class_text_embeddings(loaded, classnames, templates, normalize=True, renormalize=renormalize,
                                       device=device)
    runner = TeacherRunner(ZeroShotTeacher(loaded.model.visual, embeddings, renormalize=renormalize).to(device),
                           dtype=dtype, compile=compile, batch_size=batch_size)
    return LoadedTeacher(runner=runner, preprocess=loaded.preprocess, description=loaded.describe())


class OnlineTeacher:
    """A zero-shot teacher run in the training loop on each view (the reference's way; no cache).

    Each sample shows view 1 + its stream epoch, a RandomResizedCrop + flip drawn exactly as stage one
    draws views (`views`); the data stream renders it at the teacher's size too, and `targets` turns the
    teacher's logits on those pixels into the same TeacherTargets a cache gives.
    """

    def __init__(self, loaded: LoadedTeacher, *, seed: int, crop_scale: tuple[float, float], device):
        from .pixels import Normalizer
        from .views import VIEW0_WHOLE, ViewPolicy

        self.runner = loaded.runner
        self.image_size = loaded.preprocess.image_size
        self.views = ViewPolicy(num_views=2**31 - 1, seed=seed, view0=VIEW0_WHOLE, crop_scale=tuple(crop_scale))
        self.normalize = Normalizer(loaded.preprocess.mean, loaded.preprocess.std, device)

    def targets(self, batch: dict, temperature: float):
        """TeacherTargets of a batch whose views were also rendered at the teacher's size."""
        from .cache_reader import TeacherTargets

        logits = self.runner(self.normalize(batch[f"pixels_{self.image_size[0]}"]))
        return TeacherTargets.from_logits(logits, temperature, keys=batch["keys"], boxes=batch["boxes"],
                                          flips=batch["flips"])
