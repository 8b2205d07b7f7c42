"""Run `dho-pipeline ARGS...` in this process with faults armed: a real SIGKILL of this very process
at a chosen point of a write. Used by the fault-injection tests; nothing in dho-pipeline knows about it.

    python fault_runner.py '<json spec>' ARGS...

spec = {"fired": "/path/log",          # each fault appends one line here just before it fires
        "faults": [FAULT, ...]}

FAULT kinds (each fires on the `nth` matching call, counting from 1):
  {"kind": "zarr_put", "match": REGEX, "contains": TEXT, "when": "before" | "partial" | "after"}
      zarr's LocalStore writes every object (chunk or zarr.json) through `_put`; REGEX is searched in
      the object's path, TEXT (optional) in its bytes. "before": die before writing; "partial": die
      with half the bytes in zarr's temporary file (the moment a kill inside write() leaves behind);
      "after": die right after the object is in place.
  {"kind": "rename", "match": REGEX}
      die just before an os.rename whose source path matches (a checkpoint's temporary directory,
      written whole, not yet renamed).
  {"kind": "torch_save", "match": REGEX}
      die inside torch.save to a matching path, with half of the file written.
  {"kind": "rmtree", "match": REGEX}
      die inside shutil.rmtree of a matching directory: its files deleted, the directory still there
      (the moment a kill while pruning an old checkpoint leaves behind).
  {"kind": "optimizer_step"}
      die inside an optimiser step (after forward and backward, before the weights change).
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import sys
import threading


def main() -> None:
    spec = json.loads(sys.argv[1])
    args = sys.argv[2:]
    fired_log = spec.get("fired")
    lock = threading.Lock()
    counts: dict[int, int] = {}

    def due(index: int, fault: dict) -> bool:
        with lock:
            counts[index] = counts.get(index, 0) + 1
            return counts[index] == fault.get("nth", 1)

    def die(fault: dict, detail: str) -> None:
        if fired_log:
            with open(fired_log, "a", encoding="utf-8") as log:
                log.write(json.dumps({"kind": fault["kind"], "detail": detail}) + "\n")
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    for index, fault in enumerate(spec.get("faults", [])):
        kind = fault["kind"]
        if kind == "zarr_put":
            import zarr.storage._local as local

            real_put = local._put

            def put(path, value, exclusive=False, _real=real_put, _index=index, _fault=fault):
                data = bytes(value.as_buffer_like())
                if re.search(_fault["match"], str(path)) and _fault.get("contains", "").encode() in data \
                        and due(_index, _fault):
                    when = _fault.get("when", "before")
                    if when == "partial":
                        path.parent.mkdir(parents=True, exist_ok=True)
                        with local._atomic_write(path, "wb", exclusive=exclusive) as handle:
                            handle.write(data[: len(data) // 2])
                            handle.flush()
                            die(_fault, f"partial {path}")
                    elif when == "after":
                        _real(path, value, exclusive)
                    die(_fault, f"{when} {path}")
                return _real(path, value, exclusive)

            local._put = put
        elif kind == "rename":
            real_rename = os.rename

            def rename(src, dst, *a, _real=real_rename, _index=index, _fault=fault, **k):
                if re.search(_fault["match"], str(src)) and due(_index, _fault):
                    die(_fault, f"before rename {src} -> {dst}")
                return _real(src, dst, *a, **k)

            os.rename = rename
        elif kind == "torch_save":
            import torch

            real_save = torch.save

            def save(obj, f, *a, _real=real_save, _index=index, _fault=fault, **k):
                if isinstance(f, (str, os.PathLike)) and re.search(_fault["match"], str(f)) and due(_index, _fault):
                    buffer = io.BytesIO()
                    _real(obj, buffer, *a, **k)
                    with open(f, "wb") as handle:
                        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                    die(_fault, f"inside torch.save {f}")
                return _real(obj, f, *a, **k)

            torch.save = save
        elif kind == "rmtree":
            import shutil

            real_rmtree = shutil.rmtree

            def rmtree(path, *a, _real=real_rmtree, _index=index, _fault=fault, **k):
                if re.search(_fault["match"], str(path)) and os.path.isdir(path) and due(_index, _fault):
                    for name in os.listdir(path):
                        if os.path.isfile(os.path.join(path, name)):
                            os.remove(os.path.join(path, name))
                    die(_fault, f"inside rmtree {path}")
                return _real(path, *a, **k)

            shutil.rmtree = rmtree
        elif kind == "optimizer_step":
            import torch

            real_step = torch.optim.AdamW.step

            def step(self, *a, _real=real_step, _index=index, _fault=fault, **k):
                if due(_index, _fault):
                    die(_fault, "inside AdamW.step")
                return _real(self, *a, **k)

            torch.optim.AdamW.step = step
        else:
            raise SystemExit(f"fault_runner: unknown fault kind {kind!r}")

    from dho_pipeline.stages.cli import main as cli_main

    cli_main(args, prog_name="dho-pipeline")


if __name__ == "__main__":
    main()
