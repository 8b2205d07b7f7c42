"""Content fingerprints: short, stable hex digests of files, byte streams and JSON-able values."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, BinaryIO

_READ_BLOCK = 1 << 20
SAMPLED_BLOCKS = 16  # blocks hashed by `sampled_fingerprint`, first and last included
SAMPLED_BLOCK_BYTES = 4096
# How a file is compared with what was recorded of it: "quick", its size and sampled_fingerprint;
# "full", its sha256 (every byte read).
FILE_CHECKS = ("quick", "full")


def fingerprint_json(value: Any) -> str:
    """sha256 of the canonical JSON text of `value` (sorted keys, no whitespace)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def fingerprint_file(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    with open(path, "rb") as stream:
        return fingerprint_stream(stream)


def fingerprint_stream(stream: BinaryIO) -> str:
    """sha256 of what is left to read in a binary stream."""
    digest = hashlib.sha256()
    while block := stream.read(_READ_BLOCK):
        digest.update(block)
    return "sha256:" + digest.hexdigest()


def sampled_fingerprint(stream: BinaryIO, size: int) -> str:
    """sha256 of 16 blocks of 4 KiB spread evenly over a file of `size` bytes (the whole file when it
    is smaller than 64 KiB): a cheap check that a file is still the one that was scanned.

    Any file rewritten with other content (a shard re-made with another seed, another tar of the same
    size) differs in nearly every block; a change confined to a few bytes between blocks needs the
    full sha256. Reads at most 64 KiB; `stream` is left at an undefined position.
    """
    digest = hashlib.sha256(str(size).encode())
    if size <= SAMPLED_BLOCKS * SAMPLED_BLOCK_BYTES:
        stream.seek(0)
        digest.update(stream.read(size))
    else:
        last = size - SAMPLED_BLOCK_BYTES
        for i in range(SAMPLED_BLOCKS):
            stream.seek(i * last // (SAMPLED_BLOCKS - 1))
            digest.update(stream.read(SAMPLED_BLOCK_BYTES))
    return "sha256:" + digest.hexdigest()


def safetensors_fingerprint(path: str | Path) -> str:
    """sha256 of a safetensors file's tensors (name, dtype, shape, bytes) and metadata, in sorted order.

    The file's bytes are not a stable identity: safetensors writes its header map in hash order, which
    differs from process to process.
    """
    import torch
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(path), framework="pt") as handle:
        digest.update(json.dumps(handle.metadata(), sort_keys=True).encode())
        for name in sorted(handle.keys()):
            tensor = handle.get_tensor(name).contiguous()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def weights_fingerprint(path: str | Path) -> str:
    """What identifies a weights file: its tensors for safetensors, its bytes otherwise."""
    return safetensors_fingerprint(path) if str(path).endswith(".safetensors") else fingerprint_file(path)


class HashingReader:
    """A read-only file wrapper that hashes every byte read through it.

    Lets one pass over a tar file both parse it and fingerprint it; `finish()` reads whatever the
    parser left unread (tar end padding) so the digest always covers the whole file.
    """

    def __init__(self, stream: BinaryIO):
        self._stream = stream
        self._digest = hashlib.sha256()
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._digest.update(data)
        self.bytes_read += len(data)
        return data

    def finish(self) -> str:
        while self.read(_READ_BLOCK):
            pass
        return "sha256:" + self._digest.hexdigest()
