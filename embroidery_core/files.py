"""Atomic file writes and file names that are safe on every OS ComfyUI runs on.

    with atomic_path("out/metrics.json") as tmp:
        write_something(tmp)

The body writes ``tmp`` (a unique name next to the target, so the final rename never crosses a
file system); on success it is flushed to disk and renamed over the target, on any error,
Cancel or KeyboardInterrupt included, it is removed and the target is left as it was.

A process killed in the middle of a write (the server shut down, the power cut) cannot remove
its temp file, so each write also removes the stale temp files of earlier writes in the same
folder. Only names of our own pattern (``<name>.embroidery-partial-<pid>-<hex>``) are touched,
and only when no live write can own them (see :func:`remove_stale_partials`).
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Iterator

PARTIAL_MARK = ".embroidery-partial-"
_PARTIAL = re.compile(re.escape(PARTIAL_MARK) + r"(\d+)-[0-9a-f]{8}$")
# A write keeps touching its temp file; one left alone this long belongs to no live write.
STALE_AFTER_S = 3600.0

_active: set[str] = set()  # temp files this process is writing now
_active_lock = threading.Lock()


def _pid_alive(pid: int) -> bool | None:
    """True/False on POSIX; None where it cannot be asked safely (on Windows ``os.kill(pid, 0)``
    sends CTRL_C_EVENT)."""
    if sys.platform == "win32":
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_partials(directory: str, now: float | None = None) -> list[str]:
    """Delete our temp files in ``directory`` that no write owns any more: not written by this
    process now, and either their process is gone or they were last touched an hour ago or more.
    Returns the removed names. Other files, other patterns and subfolders are never touched."""
    now = time.time() if now is None else now
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        match = _PARTIAL.search(name)
        path = os.path.join(directory, name)
        if match is None or not os.path.isfile(path):
            continue
        with _active_lock:
            if path in _active:
                continue
        pid = int(match.group(1))
        alive = False if pid == os.getpid() else _pid_alive(pid)
        with contextlib.suppress(OSError):
            if alive is False or now - os.path.getmtime(path) >= STALE_AFTER_S:
                os.remove(path)
                removed.append(name)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_stale_partials(directory)
    tmp = os.path.join(directory, f"{os.path.basename(path)}{PARTIAL_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    with _active_lock:
        _active.add(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    finally:
        with _active_lock:
            _active.discard(tmp)


def write_text(path: str | os.PathLike, text: str) -> str:
    """``text`` to ``path`` (UTF-8), atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    return os.fspath(path)


# ---------------------------------------------------------------------------- names

# Characters Windows refuses in a file name, plus the ASCII control characters.
_WINDOWS_FORBIDDEN = re.compile(r'[<>:"|?*\x00-\x1f]')
# Device names Windows reserves in any folder, with any extension (CON.txt is the console too).
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


def _component_problem(part: str) -> str | None:
    if part in ("", ".", ".."):
        return "an empty, '.' or '..' folder"
    bad = sorted(set(_WINDOWS_FORBIDDEN.findall(part)))
    if bad:
        return f"the character(s) {' '.join(repr(c) for c in bad)}, which Windows does not allow in file names"
    if part[-1] in ". ":
        return f"{part!r}, which ends in a dot or space (Windows drops those)"
    if part.split(".")[0].upper() in _WINDOWS_RESERVED:
        return f"{part!r}, a device name Windows reserves"
    return None


def safe_relative_name(text: str) -> str:
    """A user's file name (``embroidery/my_style``) as a relative path inside a models folder that
    is valid on Windows, macOS and Linux, with '/' separators. ValueError says what is wrong:
    absolute paths, drive letters (``D:evil``), ``..``, characters or names Windows refuses."""
    name = text.strip().replace("\\", "/")
    if not name:
        raise ValueError("the name is empty")
    if name.startswith("/"):
        raise ValueError(f"{text!r} is an absolute path")
    name = name.rstrip("/")
    for part in name.split("/"):
        problem = _component_problem(part)
        if problem:
            raise ValueError(f"{text!r} contains {problem}")
    return name


def filename_part(text: str, fallback: str = "style") -> str:
    """Any text (a trigger word like ``<emb>``) -> a piece of a file name valid everywhere:
    forbidden characters and separators become '_', trailing dots and spaces are dropped."""
    part = _WINDOWS_FORBIDDEN.sub("_", text.strip()).replace("/", "_").replace("\\", "_").rstrip(". ")
    if not part or part.split(".")[0].upper() in _WINDOWS_RESERVED:
        part = f"{fallback}_{part}" if part else fallback
    return part
