"""Progress bars: tqdm on a terminal; off when stderr is not one (a log file, a pipe, CI) or when the
user asked for quiet (`dho-pipeline --quiet ...`, or DHO_PIPELINE_QUIET=1, which child processes inherit)."""

from __future__ import annotations

import os
import sys

QUIET_VARIABLE = "DHO_PIPELINE_QUIET"


def set_quiet(quiet: bool) -> None:
    if quiet:
        os.environ[QUIET_VARIABLE] = "1"
    else:
        os.environ.pop(QUIET_VARIABLE, None)


def bars_wanted() -> bool:
    """On a terminal, unless quiet; under a launcher (torchrun, accelerate launch) on rank 0 only."""
    return os.environ.get(QUIET_VARIABLE, "") in ("", "0") and sys.stderr.isatty() and os.environ.get("RANK", "0") == "0"


def progress(iterable=None, *, show: bool = True, **options):
    """A tqdm bar (same arguments), shown only when `show` (e.g. on the main process) and bars are wanted."""
    from tqdm import tqdm

    return tqdm(iterable, disable=not (show and bars_wanted()), dynamic_ncols=True, **options)
