"""Where a measurement or a file came from: the git commit of the checkout, for benchmark
reports, and the arithmetic of the machine, for files that rebuild bit for bit only on it."""
from __future__ import annotations

import os
import platform
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


def cpu_name() -> str:
    """The CPU's model name as the kernel reports it (platform's guess where it does not)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def arithmetic() -> str:
    """What a float computation's last bits depend on beyond its code, inputs and thread count:
    the CPU, the vector instructions torch's kernels chose on it, and the torch and numpy builds.
    Where it agrees, two runs of a training command (same code, inputs, threads) are expected to
    agree bit for bit; where it differs they can differ (measured: the same command under
    torch's AVX512 and AVX2 kernels on one machine gives other weights). It is a record, not a
    proof: a difference it does not name (another machine's libraries) can still change bits."""
    import numpy
    import torch

    return (f"{cpu_name()}; ATen {torch.backends.cpu.get_cpu_capability()}; "
            f"torch {torch.__version__}; numpy {numpy.__version__}")
