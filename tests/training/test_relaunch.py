"""A training driver killed mid-run (SIGKILL) and relaunched with the same name resumes from its
last checkpoint instead of starting over (RunConfig name + storage_path, get_checkpoint)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.training.conftest import make_features, write_store

DRIVER = """
import sys, ray
from tests.training.conftest import small_config
from training.train import train
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
train(small_config(engine="ray", epochs=int(sys.argv[2]), fusion="concat", patience=50), sys.argv[1], name="relaunch")
"""


@pytest.mark.slow
def test_relaunch_with_the_same_name_resumes(tmp_path):
    store = write_store(tmp_path, make_features(n=240))
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    run_dir = Path(store) / "models" / "_ray" / "relaunch"
    cmd = [sys.executable, str(script), store, "40"]
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root))
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(list(run_dir.rglob("checkpoint_*"))) < 2 and proc.poll() is None:
            time.sleep(0.5)
        assert list(run_dir.rglob("checkpoint_*")), (tmp_path / "first.log").read_text()[-3000:]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((Path(store) / "models" / "relaunch" / "metrics.json").read_text())
    assert metrics["resumed_at"] and all(e > 0 for e in metrics["resumed_at"])   # resumed, not restarted
    assert [h["epoch"] for h in metrics["history"]] == list(range(40))   # one history, no restart from 0
