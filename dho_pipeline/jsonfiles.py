"""Reading and writing the project's JSON files: one-line errors in, whole files out."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError


def read_json(path: str | Path, what: str, remedy: str) -> Any:
    """Parse a JSON file; any fault is a UserError naming `what` and `path` and ending with `remedy`."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist; {remedy}") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a directory, not a file") from None
    except (OSError, ValueError, RecursionError) as error:  # ValueError covers bad UTF-8 and bad JSON
        detail = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise UserError(f"{what} {path} is not a readable JSON file ({detail}); {remedy}") from None


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary name beside `path` for the block to write; renamed onto `path` when the block ends
    without an error (readers see the old file or the new one, never half), removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write under a temporary name and rename (atomic_path)."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
