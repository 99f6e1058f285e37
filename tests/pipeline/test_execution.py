"""How the processing pass runs: a Ray Data block holds several stage batches, the stages still see
their own batch size (dedup the whole block), and the result (features and shards) is the one the
driver's local path gives; a warm driver starts the dedup index actor before the scan."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from deltalake import DeltaTable

from pipeline import execution
from pipeline.orchestration import Pipeline
from core.config import Config, Resources
from pipeline.demo import make_demo
from pipeline.execution import Group, StageChain, block_rows
from pipeline.runner import run
from stages.base import STATS_COLUMN, StageContext, StageStats, decode_stats
from tests.pipeline.helpers import config, shard_members
from tests.stages.helpers import make_batch


def _groups(*batch_sizes: int) -> list[Group]:
    return [Group([], Resources(batch_size=b)) for b in batch_sizes]


def test_block_rows_spread_capped_and_never_below_a_stage_batch():
    cfg = Config.model_validate({"execution": {"block_rows": 256, "batch_size": 32}})
    assert block_rows(30_000, _groups(32), cfg, num_cpus=2) == 256      # capped
    assert block_rows(3_008, _groups(32), cfg, num_cpus=2) == 188       # 16 blocks: 8 per CPU
    assert block_rows(100, _groups(32), cfg, num_cpus=2) == 32          # one stage batch at least
    assert block_rows(30_000, _groups(32, 512), cfg, num_cpus=2) == 512  # a GPU batch is not cut


def test_rows_to_batch_types_columns_as_arrow_would_and_fills_missing_keys():
    from stages.base import rows_to_batch

    batch = rows_to_batch([{"id": "a", "n": 1, "ok": True, "x": 0.5, "image": b"\x00\x01"},
                           {"id": "b", "n": 2, "ok": False, "x": 1.5, "text": "hi"}])
    assert list(batch) == ["id", "n", "ok", "x", "image", "text"]
    assert batch["n"].dtype == np.int64 and batch["ok"].dtype == bool and batch["x"].dtype == np.float64
    assert batch["id"].dtype == object and batch["image"].tolist() == [b"\x00\x01", None]
    assert batch["text"].tolist() == [None, "hi"]


def test_build_dataset_hands_the_actors_every_row_as_it_was(ray_session):
    """The rows go to the object store by reference, a block's worth per put; the first actor pool
    rebuilds them: every row once, in order, media bytes and uneven keys intact."""
    rows = [{"id": f"r{i}", "row": i, "image": bytes([i % 256]) * (i + 1)} | ({"text": f"t{i}"} if i % 3 else {})
            for i in range(100)]
    cfg = Config.model_validate({"execution": {"block_rows": 16, "batch_size": 8}})
    ds = execution.build_dataset(rows, [], StageContext(), cfg, num_cpus=2)
    out = {b["id"][i]: {k: v[i] for k, v in b.items()} for b in execution.iter_output(ds) for i in range(len(b["id"]))}
    assert sorted(out) == sorted(r["id"] for r in rows)
    for r in rows:
        o = out[r["id"]]
        assert (o["row"], o["image"], o["text"]) == (r["row"], r["image"], r.get("text"))


class _Recorder:
    """A stage that records the batch sizes it is called with and drops every third row."""
    name = "recorder"
    whole_block = False

    def __init__(self):
        self.sizes: list[int] = []

    def take_stats(self) -> StageStats:   # the block's record, what the chain sends on
        return StageStats(self.name, rows_in=sum(self.sizes))

    def __call__(self, batch):
        self.sizes.append(len(batch["id"]))
        keep = np.arange(len(batch["id"])) % 3 != 2
        return {k: v[keep] for k, v in batch.items()}


def test_stage_chain_cuts_a_block_into_stage_batches():
    chain = StageChain([], {}, batch_size=32)
    chain.stages = [recorder := _Recorder()]
    block = make_batch(text=[f"t{i}" for i in range(70)])
    out = list(chain(block))
    assert recorder.sizes == [32, 32, 6]
    ids = [i for b in out for i in b["id"]]
    assert ids == [f"row{i}" for i in range(70) if i % 32 % 3 != 2]
    for b in out:   # the block's stats records ride in its first row
        assert decode_stats(b[STATS_COLUMN][0]) == [StageStats("recorder", rows_in=70)]
        assert not any(b[STATS_COLUMN][1:])


def test_a_whole_block_stage_is_called_once_per_block():
    """Dedup asks for whole blocks: one round trip to the run's index per block, not per stage batch."""
    from stages.dedup import Dedup

    chain = StageChain([], {}, batch_size=32)
    per_batch, whole = _Recorder(), _Recorder()
    whole.whole_block = True
    chain.stages = [per_batch, whole]
    out = list(chain(make_batch(text=[f"t{i}" for i in range(70)])))
    assert per_batch.sizes == [32, 32, 6] and whole.sizes == [22 + 22 + 4]
    assert len(out) == 1 and len(out[0]["id"]) == 32 and Dedup.whole_block


def test_blocks_of_several_batches_give_the_local_result(tmp_path, ray_session, monkeypatch):
    manifest = make_demo(tmp_path / "data", n=40)   # 48 rows with the bad ones
    monkeypatch.setattr(execution, "BLOCKS_PER_CPU", 1)   # 2 blocks of 24 rows, not 16 of 3

    def features(name: str, execution: dict):
        folder, store = tmp_path / name, tmp_path / name / "store"
        folder.mkdir()
        record = run(config(folder, manifest, store, {"execution": execution}), log=lambda s: None).record
        table = DeltaTable(str(store / "features")).to_pyarrow_table(
            columns=["id", "aug", "image_emb", "text_emb", "audio_emb"])
        return table.sort_by([("id", "ascending"), ("aug", "ascending")]), record["shard_writer"], _samples(store)

    # Ray Data blocks of 24 rows, stage batches of 8: each task runs three stage batches.
    assert block_rows(48, _groups(8), Config.model_validate({"execution": {"block_rows": 24}}), 2) == 24
    on_ray, ray_writer, ray_samples = features("ray", {"batch_size": 8, "block_rows": 24, "local_max_rows": 0})
    local, local_writer, local_samples = features("local", {"batch_size": 8, "local_max_rows": 10_000})
    # The actors' shards (one per block) hold the same samples as the driver's, byte for byte.
    assert (ray_writer, local_writer) == ("actors", "driver")
    assert len(ray_samples) == on_ray.num_rows and ray_samples == local_samples
    assert on_ray.num_rows > 30
    assert on_ray["id"].to_pylist() == local["id"].to_pylist()
    for col in ("image_emb", "text_emb", "audio_emb"):
        assert pc.all(pc.equal(pc.list_value_length(on_ray[col]), pc.list_value_length(local[col]))).as_py()
        np.testing.assert_array_equal(np.asarray(on_ray[col].combine_chunks().flatten()),
                                      np.asarray(local[col].combine_chunks().flatten()))


def _samples(store: Path) -> dict[str, dict[str, bytes]]:
    """Every sample in the store's shards: key -> member extension -> bytes (run id left out)."""
    out: dict[str, dict[str, bytes]] = {}
    for members in shard_members(store / "samples").values():
        for name, data in members:
            key, ext = name.split(".", 1)
            if ext == "json":
                data = json.dumps({k: v for k, v in json.loads(data).items() if k != "run_id"}).encode()
            out.setdefault(key, {})[ext] = data
    return out


def test_a_warm_driver_seeds_an_index_started_before_the_scan(tmp_path, ray_session, monkeypatch):
    """With Ray up and more new inputs than local_max_rows, the run's dedup index actor starts
    before the scan and is seeded after the plan: a new row that repeats a stored one is still a
    duplicate of the stored row."""
    from stages import dedup

    manifest = make_demo(tmp_path / "data", n=20)
    store = tmp_path / "store"
    cfg = config(tmp_path, manifest, store)
    run(cfg, log=lambda s: None)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    copy = dict(rows[1], id="copy", label="another")   # the same media as s00001, a label of its own
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows + [copy]))

    started, start_index, scan = [], dedup.start_index, Pipeline.scan_records

    def scan_after_start(*args, **kwargs):
        assert started, "the index actor starts before the scan"
        return scan(*args, **kwargs)

    monkeypatch.setattr(dedup, "start_index", lambda name, params: (started.append(name), start_index(name, params)))
    monkeypatch.setattr(Pipeline, "scan_records", scan_after_start)
    record = run(cfg, log=lambda s: None).record
    assert started == [dedup.index_name(record["run_id"])] and record["counts"]["processed"] == 1
    rejects = DeltaTable(str(store / "rejects")).to_pyarrow_table().to_pylist()
    assert [(r["reason"], r["detail"]) for r in rejects if r["id"] == "copy"] == [("duplicate", "s00001")]



def test_the_dashboard_starts_where_ray_runs_long_enough_to_watch():
    from pipeline.execution import DASHBOARD_ROWS, dashboard_wanted

    auto = Config.model_validate({"store": "s"})
    assert auto.ray.dashboard == "auto"
    assert not dashboard_wanted(auto, 7_200) and dashboard_wanted(auto, DASHBOARD_ROWS)
    assert dashboard_wanted(auto, None)   # training, tuning, serving, search
    on, off = (Config.model_validate({"store": "s", "ray": {"dashboard": v}}) for v in (True, False))
    assert dashboard_wanted(on, 10) and not dashboard_wanted(off, None)


def test_a_ray_on_this_machine_shares_its_disk():
    here = {"NodeManagerAddress": "10.0.0.5"}
    assert not execution.beyond_this_machine([here], "10.0.0.5")   # `ray start --head` here, then ray.address: auto
    assert execution.beyond_this_machine([{"NodeManagerAddress": "10.0.0.9"}], "10.0.0.5")
    assert execution.beyond_this_machine([here, {"NodeManagerAddress": "10.0.0.5"}], "10.0.0.5")   # two nodes: a cluster
