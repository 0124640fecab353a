"""The errors saejax raises for a user's mistake, a damaged input or a failing file system.

Every one derives from `SaejaxError`: the CLI turns any `SaejaxError` into one line naming the
field, file or shape at fault (no traceback). Each class keeps the built-in base it always had
(ValueError, RuntimeError), so code that catches those still does.
"""

import os
import re


class SaejaxError(Exception):
    """Base of the errors below: reported by the CLI as one line, never a traceback."""


class ConfigError(SaejaxError, ValueError):
    """A config value or combination is invalid; the message names the field."""


class CheckpointError(SaejaxError, RuntimeError):
    """Checkpoints exist but none of them restores and verifies."""


class NonFiniteLossError(SaejaxError, RuntimeError):
    """The loss became NaN/Inf; the run stopped without saving the bad state."""


class Preempted(SaejaxError, RuntimeError):
    """A preemption notice (SIGTERM) stopped the run: every process saved a checkpoint at the
    same step; rerunning the same command resumes from it. The CLI exits 75 (EX_TEMPFAIL)."""


class StorageError(SaejaxError, RuntimeError):
    """Reading or writing a run directory failed (it is a file or sits under one, the disk is
    read-only or full, ...). The message names the path and the OS error and, when the run has
    a checkpoint, the last good step and that rerunning the same command resumes."""


def os_fault(e: BaseException) -> str | None:
    """The operating-system error behind `e`, on one line ("No space left on device: PATH"), or
    None when there is none: an OSError in its chain of causes, or a TensorStore message (Orbax
    checkpoint writes) carrying `os_error_code=N`."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.strerror:
            return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
        code = re.search(r"os_error_code='?(\d+)", str(e))
        if code:
            return f"{os.strerror(int(code.group(1)))} (errno {code.group(1)})"
        e = e.__cause__ or e.__context__
    return None


def resume_hint(step: int | None) -> str:
    """What a stopped run's one-line error ends with when it has a checkpoint to resume from."""
    if step is None:
        return ""
    return f"; last good checkpoint: step {step}; rerun the same command to resume"
