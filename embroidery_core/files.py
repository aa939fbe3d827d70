"""Atomic file writes: a reader (LoraLoader, a user's viewer, the next run) sees the old file or
the complete new one, never a half-written one.

    with atomic_path("out/metrics.json") as tmp:
        write_something(tmp)

The body writes ``tmp`` (a unique name next to the target, so the final rename never crosses a
file system); on success it is flushed to disk and renamed over the target, on any error,
Cancel or KeyboardInterrupt included, it is removed and the target is left as it was.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f"{os.path.basename(path)}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> str:
    """``text`` to ``path`` (UTF-8), atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    return os.fspath(path)
