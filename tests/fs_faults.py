"""File-system faults for tests: a disk that fills up, without root or a special mount."""

from __future__ import annotations

import contextlib
import resource
import signal


@contextlib.contextmanager
def file_size_limit(n_bytes: int):
    """Writes past `n_bytes` into any file of this process fail with EFBIG ("File too large"),
    as on a full disk (RLIMIT_FSIZE; SIGXFSZ ignored, so the write fails instead of the
    process being killed). Works as root, where chmod does not stop writes."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
