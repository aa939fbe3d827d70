"""Atomic writes: the target is the old file or the complete new one, and no temp file is left."""
import os

import pytest

from embroidery_core.files import atomic_path, write_text


def test_write_replaces_the_target_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    write_text(target, "old")
    write_text(target, "new")
    assert target.read_text() == "new"
    assert os.listdir(target.parent) == ["metrics.json"]


def test_an_error_while_writing_keeps_the_old_file_and_removes_the_temp(tmp_path):
    target = tmp_path / "sheet.png"
    target.write_text("complete old file")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise KeyboardInterrupt  # a Cancel or Ctrl-C in the middle of a write
    assert target.read_text() == "complete old file"
    assert os.listdir(tmp_path) == ["sheet.png"]
