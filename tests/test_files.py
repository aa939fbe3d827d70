"""Atomic writes (the target is the old file or the complete new one, and no temp file is left, not even
after a kill) and file names that every OS accepts."""
import os
import time

import pytest

from embroidery_core.files import (PARTIAL_MARK, STALE_AFTER_S, atomic_path, filename_part, remove_stale_partials,
                                   safe_relative_name, write_text)


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


# ---------------------------------------------------------------------------- stale temp files

KILLED_WRITER = """
import sys, time
from embroidery_core.files import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    with open(tmp, "wb") as f:
        f.write(b"half a checkpoint")
        f.flush()
    print(tmp, flush=True)
    time.sleep(60)
"""


def _killed_mid_write(target):
    """A real process killed (SIGKILL: no handler runs) while it writes ``target``."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True,
                            cwd=root)
    tmp = proc.stdout.readline().strip()
    proc.kill()
    proc.wait()
    return tmp


def test_a_write_killed_midway_leaves_a_temp_that_the_next_write_removes(tmp_path):
    target = tmp_path / "emb_stage1_0123abcd.safetensors"
    target.write_text("the complete earlier checkpoint")
    tmp = _killed_mid_write(target)
    assert os.path.isfile(tmp) and PARTIAL_MARK in tmp  # what a killed server leaves behind
    assert target.read_text() == "the complete earlier checkpoint"
    foreign = ["other.safetensors.tmp-12345-abcdef12", "notes.embroidery-partial-x", "keep.safetensors"]
    for name in foreign:
        (tmp_path / name).write_text("someone else's")

    write_text(tmp_path / "another.json", "{}")  # the next write to that folder
    assert not os.path.exists(tmp)
    assert sorted(os.listdir(tmp_path)) == sorted(foreign + [target.name, "another.json"])


def test_cleanup_spares_live_writes_and_removes_old_orphans(tmp_path):
    target = tmp_path / "a.safetensors"
    with atomic_path(target) as mine:
        open(mine, "w").close()
        write_text(tmp_path / "b.json", "{}")  # a second write in the same folder, same process
        assert os.path.exists(mine)  # still being written: kept
    # an orphan whose pid is alive (pid 1 always is) is kept until it is an hour old
    orphan = tmp_path / f"c.safetensors{PARTIAL_MARK}1-0011aabb"
    orphan.write_text("?")
    assert remove_stale_partials(str(tmp_path)) == []
    old = time.time() - STALE_AFTER_S - 1
    os.utime(orphan, (old, old))
    assert remove_stale_partials(str(tmp_path)) == [orphan.name]


# ---------------------------------------------------------------------------- names every OS accepts

@pytest.mark.parametrize("text", ["D:evil", "C:\\Users\\x", "/abs/path", "\\\\server\\share\\x", "a/../b",
                                  "..", "emb/<x>", "what?", "CON", "nul.safetensors", "trailing.", "sub /x ",
                                  "a//b", ""])
def test_unsafe_names_are_refused(text):
    with pytest.raises(ValueError):
        safe_relative_name(text)


def test_safe_names_keep_their_folders():
    assert safe_relative_name(" embroidery/my_style ") == "embroidery/my_style"
    assert safe_relative_name("embroidery\\my style v2/") == "embroidery/my style v2"
    assert safe_relative_name("console/connie") == "console/connie"  # CON only as a whole name


def test_filename_part_makes_any_trigger_a_valid_name():
    assert filename_part("<emb>") == "_emb_"
    assert filename_part("a/b\\c:d") == "a_b_c_d"
    assert filename_part("CON") == "style_CON"
    assert filename_part("sks") == "sks"
    for text in ("<emb>", "CON", "x.", "a|b"):
        safe_relative_name(filename_part(text))  # never refused
