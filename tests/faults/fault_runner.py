"""Run `dho-pipeline ARGS...` in this process with faults armed: a real SIGKILL of this very process
at a chosen point of a write or of the work. Used by the fault-injection tests; nothing in dho-pipeline
knows about it.

    python fault_runner.py '<json spec>' ARGS...

spec = {"fired": "/path/log",          # each fault appends one JSON line here at its injection point
        "faults": [FAULT, ...]}

Each fault fires on the `nth` matching call (counting from 1) and then does its `action`:
"kill" (the default): append {"kind", "detail", "pid"} to the fired log, then SIGKILL this process;
"hold": append the line, wait until the file named by "until" exists, then let the call go on (a
        process parked at a known point, e.g. a writer holding the cache lock).
The fired line is the proof that the fault landed where the test aimed it: its `detail` names the
write (the path) or the call (its number). A test that finds no line for a planned fault fails.

FAULT kinds:
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
  {"kind": "call", "target": "package.module:Name.attr"}
      die as the named function or method is called (e.g. the teacher's forward of batch n, the
      decoding of image n). Only calls in this process count: run with --workers 0.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import re
import signal
import sys
import threading
import time


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

    def fire(fault: dict, detail: str) -> None:
        """The injection point: leave the marker line, then die (or wait at the gate and go on)."""
        action = fault.get("action", "kill")
        if fired_log:
            with open(fired_log, "a", encoding="utf-8") as log:
                log.write(json.dumps({"kind": fault["kind"], "action": action, "detail": detail,
                                      "pid": os.getpid()}) + "\n")
        if action == "hold":
            while not os.path.exists(fault["until"]):
                time.sleep(0.01)
            return
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
                            fire(_fault, f"partial {path}")
                    elif when == "after":
                        _real(path, value, exclusive)
                    fire(_fault, f"{when} {path}")
                return _real(path, value, exclusive)

            local._put = put
        elif kind == "rename":
            real_rename = os.rename

            def rename(src, dst, *a, _real=real_rename, _index=index, _fault=fault, **k):
                if re.search(_fault["match"], str(src)) and due(_index, _fault):
                    fire(_fault, f"before rename {src} -> {dst}")
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
                    fire(_fault, f"inside torch.save {f}")
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
                    fire(_fault, f"inside rmtree {path}")
                return _real(path, *a, **k)

            shutil.rmtree = rmtree
        elif kind == "optimizer_step":
            import torch

            real_step = torch.optim.AdamW.step

            def step(self, *a, _real=real_step, _index=index, _fault=fault, **k):
                if due(_index, _fault):
                    fire(_fault, f"inside AdamW.step, call {_fault.get('nth', 1)}")
                return _real(self, *a, **k)

            torch.optim.AdamW.step = step
        elif kind == "call":
            module_name, qualname = fault["target"].split(":")
            owner = importlib.import_module(module_name)
            *path, name = qualname.split(".")
            for part in path:
                owner = getattr(owner, part)
            real_function = getattr(owner, name)

            def call(*a, _real=real_function, _index=index, _fault=fault, **k):
                if due(_index, _fault):
                    fire(_fault, f"call {_fault.get('nth', 1)} of {_fault['target']}")
                return _real(*a, **k)

            setattr(owner, name, call)
        else:
            raise SystemExit(f"fault_runner: unknown fault kind {kind!r}")

    from dho_pipeline.stages.cli import main as cli_main

    cli_main(args, prog_name="dho-pipeline")


if __name__ == "__main__":
    main()
