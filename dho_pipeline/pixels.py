"""uint8 HWC batches (what data workers produce) to normalised model input, on the device."""

from __future__ import annotations

import torch


class Normalizer:
    """(x / 255 - mean) / std for a model's mean and std; uint8 [B, H, W, 3] in, float [B, 3, H, W] out.

    Workers ship uint8 (4x fewer bytes than float); the division happens on the device. The permuted
    tensor is channels-last in memory, which convolutions (the ViT patch embedding) like.
    """

    def __init__(self, mean, std, device: torch.device):
        self.device = device
        self.mean = torch.tensor(mean, device=device) * 255  # per channel, broadcast over the last axis
        self.scale = 1 / (torch.tensor(std, device=device) * 255)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        # In place on the contiguous HWC float copy (half the memory traffic of NCHW arithmetic),
        # then a free permute: the result is channels-last.
        pixels = pixels.to(self.device, non_blocking=True).float()
        return pixels.sub_(self.mean).mul_(self.scale).permute(0, 3, 1, 2)
