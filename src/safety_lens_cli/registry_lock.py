"""Best-effort lock between processes that share one registry folder.

Writers take the lock shared and deletions take it exclusive, so `gc` and
`rm` usually run while no write is in progress. Nothing depends on the lock:
atomic renames and the re-checks in `Registry.store` and `apply_plan` keep the
registry valid without it. Where `fcntl.flock` is missing (Windows) or fails
(some network file systems), or the lock stays busy past the timeout, the
operation runs unlocked.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
LOCK_TIMEOUT_S = 30.0
_POLL_INTERVAL_S = 0.05


@contextmanager
def registry_lock(root: Path, *, shared: bool, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[bool]:
    """Hold the registry lock while the block runs; yield whether it was acquired."""
    try:
        import fcntl
    except ImportError:
        yield False
        return

    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        logger.debug("Running without the registry lock: cannot open %s (%s)", root / LOCK_NAME, exc)
        yield False
        return

    locked = False
    try:
        mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, mode)
                locked = True
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    logger.warning(
                        "Registry lock %s still busy after %.0f s; continuing without it", root / LOCK_NAME, timeout_s
                    )
                    break
                time.sleep(_POLL_INTERVAL_S)
            except OSError as exc:
                logger.debug("Running without the registry lock: flock on %s failed (%s)", root / LOCK_NAME, exc)
                break
        yield locked
    finally:
        if locked:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
