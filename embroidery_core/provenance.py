"""Where a measurement came from: the git commit of the checkout, for benchmark reports."""
from __future__ import annotations

import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit(path: str | os.PathLike = REPO) -> dict:
    """{"commit": HEAD's hash, "dirty": whether tracked files differ from it} for the git
    checkout at ``path``; None for each where git or the repository is missing."""
    def git(*args):
        out = subprocess.run(["git", "-C", os.fspath(path), *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"commit": commit, "dirty": None if dirty is None else bool(dirty)}
