"""The commit a benchmark report names (HEAD's hash and whether tracked files were changed) and the
arithmetic a toy build file names."""
import os
import shutil
import subprocess

import pytest

from embroidery_core.provenance import git_commit

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_outside_a_repository_there_is_no_commit(tmp_path):
    assert git_commit(tmp_path) == {"commit": None, "dirty": None}


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_commit_and_dirty_flag_of_a_checkout(tmp_path):
    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    (tmp_path / "a.txt").write_text("one")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    assert git_commit(tmp_path) == {"commit": git("rev-parse", "HEAD").strip(), "dirty": False}
    (tmp_path / "untracked.txt").write_text("not counted")
    assert git_commit(tmp_path)["dirty"] is False
    (tmp_path / "a.txt").write_text("two")
    assert git_commit(tmp_path)["dirty"] is True


def test_arithmetic_names_the_kernels_torch_chose():
    """The record follows what changes a training's last bits: torch's vector kernels, chosen at
    its import by ATEN_CPU_CAPABILITY or the CPU, and the builds of torch and numpy."""
    import sys

    import numpy
    import torch

    from embroidery_core.provenance import arithmetic, cpu_name

    here = arithmetic()
    assert here.startswith(cpu_name() + "; ")
    assert f"ATen {torch.backends.cpu.get_cpu_capability()};" in here
    assert f"torch {torch.__version__}" in here and f"numpy {numpy.__version__}" in here
    script = "from embroidery_core.provenance import arithmetic; print(arithmetic())"
    plain = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                           cwd=REPO_ROOT, env={**os.environ, "ATEN_CPU_CAPABILITY": "default"}).stdout
    assert "; ATen DEFAULT;" in plain
