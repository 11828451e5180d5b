"""`launch down local` signals only the Ray head it started, not a process that reused its PID."""

from __future__ import annotations

import os
import subprocess

from cluster import local


def test_a_reused_pid_is_not_taken_for_the_head():
    other = subprocess.Popen(["sleep", "30"])
    try:
        assert not local._is_our_head(other.pid)
        assert not local._is_our_head(os.getpid())
    finally:
        other.kill()
        other.wait()


def test_down_with_a_stale_state_file_kills_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLAUNCH_HOME", str(tmp_path))
    other = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / "local").mkdir()
        (tmp_path / "local" / "head.json").write_text(f'{{"pid": {other.pid}, "address": "http://127.0.0.1:1"}}')
        assert local.down() is False
        assert other.poll() is None  # still running
        assert not (tmp_path / "local" / "head.json").exists()
    finally:
        other.kill()
        other.wait()
