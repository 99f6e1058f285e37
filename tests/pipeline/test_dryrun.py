"""``mmpipe plan``: the counts the next run will have, why rows would be recomputed, and nothing
written (the store's table versions unchanged)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from core.store import Store
from pipeline.demo import make_demo
from pipeline.dryrun import dry_run
from pipeline.runner import run
from tests.pipeline.helpers import config

MMPIPE = str(Path(sys.executable).parent / "mmpipe")


def _versions(store: Path) -> tuple[int, int, int]:
    s = Store(str(store))
    return len(s.versions("features")), len(s.versions("rejects")), len(s.runs())


def test_plan_predicts_the_next_run_and_writes_nothing(tmp_path, ray_session):
    manifest = make_demo(tmp_path / "data", n=12)
    store = tmp_path / "store"
    first = dry_run(config(tmp_path, manifest, store))   # an empty store: everything is new
    assert first["counts"]["new"] == first["counts"]["to_process"] > 0 and first["counts"]["changed"] == 0
    assert first["estimate_s"] is None and first["stages"]["cleanup.image"]["rows"] == first["counts"]["to_process"]
    assert not (store / "features").exists()
    run(config(tmp_path, manifest, store), log=lambda s: None)

    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[0]["text"] = "a brand new caption about pine trees"   # one content change
    rows = rows[1:] + [rows[0]] + [{"id": "extra", "text": "one more sample here", "label": "forest"}]
    del rows[3]                                                   # one removal
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    changed_cfg = config(tmp_path, manifest, store, {"stages": {"features": {"audio": {"params": {"n_mfcc": 13}}}}})
    before = _versions(store)
    plan = dry_run(changed_cfg)
    assert _versions(store) == before                            # nothing written
    assert plan["counts"]["new"] == 1 and plan["counts"]["removed"] == 1 and plan["estimate_s"] is not None
    assert plan["stages"]["features.audio"]["rows"] == plan["recompute"]["audio"] > 0
    assert "stage changed" in plan["stages"]["features.audio"]["why"] and "stage changed" not in plan["stages"]["features.image"]["why"]
    assert plan["stage_changes"] == [{"stage": "features.audio", "was": plan["stage_changes"][0]["was"],
                                      "now": plan["stage_changes"][0]["now"],
                                      "parameters": {"params.n_mfcc": [None, 13]}}]
    record = run(changed_cfg, log=lambda s: None).record
    counts = plan["counts"]
    assert record["counts"]["unchanged"] == counts["unchanged"] and record["counts"]["removed"] == counts["removed"]
    assert record["counts"]["processed"] == counts["to_process"] + counts["rejected_at_ingest"]


def test_cli_plan_text_and_json(tmp_path):
    manifest = make_demo(tmp_path / "data", n=8)
    from tests.pipeline.helpers import write_config

    cfg = write_config(tmp_path)
    out = subprocess.run([MMPIPE, "plan", str(cfg), "--input", str(manifest), "--store", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "nothing run, nothing written" in out.stdout and "new 12," in out.stdout   # 16 inputs, 4 rejected at ingest
    js = subprocess.run([MMPIPE, "plan", str(cfg), "--input", str(manifest), "--store", str(tmp_path / "s"), "--json"],
                        capture_output=True, text=True, timeout=120)
    assert js.returncode == 0 and json.loads(js.stdout)["counts"]["input"] == 16
    assert not (tmp_path / "s" / "features").exists()
