"""Content fingerprints: short, stable hex digests of files, byte streams and JSON-able values."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, BinaryIO

_READ_BLOCK = 1 << 20


def fingerprint_json(value: Any) -> str:
    """sha256 of the canonical JSON text of `value` (sorted keys, no whitespace)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def fingerprint_file(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(_READ_BLOCK):
            digest.update(block)
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
