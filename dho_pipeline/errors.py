"""The one exception type for mistakes a user can fix.

A `UserError` carries a one-line message that names the file, shard, key or option at fault and says
what to do. The command line prints it without a traceback and exits non-zero; anything else that
escapes is a bug in dho-pipeline and keeps its traceback.
"""


class UserError(Exception):
    """Bad input or a refused operation, explained in one line."""


class Stopped(Exception):
    """A run stopped on request (SIGTERM, SIGINT) with its state saved: one line saying how to continue.

    The command line prints it and exits with `EXIT_CODE` (75, EX_TEMPFAIL: "try again later"), which
    tells a requeueing script that rerunning (with --resume, for train) continues the work."""

    EXIT_CODE = 75
