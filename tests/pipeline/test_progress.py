"""The live progress line of ``mmpipe run``: counts, rate and time left on a terminal; nothing in a log."""
from __future__ import annotations

import io
import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline.demo import make_demo
from pipeline.progress import Progress
from tests.pipeline.helpers import write_config

MMPIPE = str(Path(sys.executable).parent / "mmpipe")


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def batch(aug: list[int], reasons: list[str | None]) -> dict:
    return {"aug": np.array(aug), "reject_reason": np.array(reasons, dtype=object)}


def test_the_line_counts_original_rows_and_rejects_and_estimates_time_left():
    out, clock = io.StringIO(), Clock()
    progress = Progress(100, stream=out, enabled=True, clock=clock)
    clock.now = 2.0
    progress.add(batch([0, 0, 1, 0, 2], ["", "image_blurry", "", None, "audio_silent"]))   # copies do not count
    assert progress.done == 3 and progress.rejected == 1
    assert out.getvalue() == "\rprocessing: 3 of 100 rows (3%) · 2 rows/s · 1 rejected · 1 min 05 s left"
    clock.now = 2.1
    progress.add(batch([0] * 7, [""] * 7))
    assert out.getvalue().count("\r") == 1          # at most one redraw per interval
    clock.now = 4.0
    progress.add(batch([0] * 90, [""] * 90))
    progress.close()
    last = out.getvalue().rsplit("\r", 1)[1]
    assert last == "processing: 100 of 100 rows (100%) · 25 rows/s · 1 rejected\n"   # left for the summary
    redraws = out.getvalue().split("\r")
    assert len(redraws[2]) == len(redraws[1])          # a shorter line is padded over the longer one


def test_the_line_is_off_when_stderr_is_not_a_terminal():
    out = io.StringIO()
    progress = Progress(10, stream=out)
    progress.add(batch([0] * 10, [""] * 10))
    progress.close()
    assert not progress.enabled and out.getvalue() == ""


def test_mmpipe_run_on_a_terminal_shows_the_line(tmp_path):
    """A small run (in the driver, no Ray) with its stderr on a pseudo-terminal, as a user sees it."""
    manifest = make_demo(tmp_path / "data", n=12)
    cfg = write_config(tmp_path, {"execution": {"local_max_rows": 200}})
    master, slave = pty.openpty()
    proc = subprocess.Popen([MMPIPE, "run", str(cfg), "--input", str(manifest), "--store", str(tmp_path / "s")],
                            stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            break
        try:
            chunk = os.read(master, 4096)
        except OSError:   # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, seen.decode(errors="replace")[-2000:]
    text = seen.decode(errors="replace")
    done = re.search(r"\rprocessing: (\d+) of (\d+) rows \(100%\) · [\d,]+ rows/s · (\d+) rejected", text)
    assert done and done[1] == done[2] and int(done[1]) > 0, text[-2000:]
    assert "processing:" not in stdout.decode()     # the summary on stdout stays clean for scripts
