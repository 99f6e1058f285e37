"""Shards written by the stage actors: one per block, named from the block's rows, never into a
run folder the driver did not make; and who writes them."""
from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from core.config import Config
from pipeline.execution import StageChain, shards_in_actors
from pipeline import sinks
from pipeline.sinks import RunSink, write_block_shards
from core.store import Store
from tests.pipeline.helpers import shard_members
from stages.modalities import MODALITIES
from tests.stages.helpers import make_batch


def block(n: int = 10) -> list[dict]:
    """Two stage batches of one block; row 3 rejected."""
    batch = make_batch(text=[f"caption {i}" for i in range(n)])
    batch["aug"] = np.zeros(n, dtype=np.int64)
    batch["reject_reason"][3] = "text_too_short"
    return [{k: v[:6] for k, v in batch.items()}, {k: v[6:] for k, v in batch.items()}]


def test_a_block_goes_to_its_own_shards_and_a_retry_rewrites_them(tmp_path):
    store = Store(str(tmp_path / "store"))
    store.fs.create_dir(store.path_of("samples", "r1"), recursive=True)   # the driver makes it

    out = write_block_shards(block(), store.uri, "r1", max_count=4)
    first = shard_members(tmp_path / "store" / "samples" / "r1")
    # 9 accepted rows, at most 4 a shard; the rejected row has none; no media leave the actor
    assert [len(v) // 2 for v in first.values()] == [4, 4, 1]   # .json + .txt per sample
    shard = np.concatenate([b["shard"] for b in out])
    assert shard[3] == "" and all(s.startswith("samples/r1/shard-") for s in np.delete(shard, 3))
    assert all(b[m][i] is None for b in out for m in ("image", "text", "audio") for i in range(len(b["id"])))
    assert np.concatenate([b["has_text"] for b in out]).tolist() == [True] * 10

    write_block_shards(block(), store.uri, "r1", max_count=4)   # the same block again, as a retried task
    assert shard_members(tmp_path / "store" / "samples" / "r1") == first           # same files, same samples, no second copy


def test_an_actor_never_makes_the_run_folder(tmp_path):
    """A killed driver's actors may still be running: once the next run has removed the
    uncommitted folder, they cannot write into it again."""
    with pytest.raises(FileNotFoundError):
        write_block_shards(block(), str(tmp_path / "store"), "gone", max_count=4)
    assert not (tmp_path / "store" / "samples" / "gone").exists()


def test_a_chain_that_drops_media_returns_the_same_features_without_them():
    """``drop_media``: the rows leave the actor with their features and ``has_<modality>``, and
    without the media bytes; nothing else changes."""
    specs = [("features.text", {"encoder": "hashed"})]
    batch = make_batch(text=[f"caption number {i}" for i in range(6)] + [None])
    kept = next(StageChain(specs, {})({k: v.copy() for k, v in batch.items()}))
    dropped = next(StageChain(specs, {}, drop_media=True)({k: v.copy() for k, v in batch.items()}))

    assert all(t is None for t in dropped["text"]) and kept["text"][0] == "caption number 0"
    assert dropped["has_text"].tolist() == [True] * 6 + [False]
    np.testing.assert_array_equal(dropped["text_emb"], kept["text_emb"])
    assert np.abs(kept["text_emb"][:6]).sum(axis=1).min() > 0   # real features, not zeros
    assert set(dropped) == set(kept) | {f"has_{m}" for m in MODALITIES}


@pytest.mark.parametrize("writer, local_store, remote, actors", [
    ("auto", True, False, True),     # one machine: the actors
    ("auto", False, True, True),     # object storage on a cluster: the actors
    ("auto", True, True, False),     # a local path on a cluster: only the driver has it
    ("actors", True, True, True),    # ... unless every node mounts it
    ("driver", False, False, False),
])
def test_who_writes_the_shards(writer, local_store, remote, actors):
    cfg = Config.model_validate({"execution": {"shard_writer": writer}})
    assert shards_in_actors(cfg, local_store, remote) is actors


def test_writing_shards_does_not_import_torch(tmp_path):
    """Importing webdataset imports torch (1.3 s, ~450 MB per process): the stage actors write
    their shards with tarfile, and the webdataset reader still reads them."""
    store = Store(str(tmp_path / "store"))
    store.fs.create_dir(store.path_of("samples", "r1"), recursive=True)
    code = ("import pickle, sys; from pipeline.sinks import write_block_shards; "
            f"write_block_shards(pickle.load(sys.stdin.buffer), {store.uri!r}, 'r1', 4); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(block()), capture_output=True, check=True)
    assert out.stdout.decode().strip() == "False", out.stderr.decode()
    shards = sorted(str(p) for p in (tmp_path / "store" / "samples" / "r1").glob("*.tar"))
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode())
    assert sorted(s["txt"] for s in samples) == sorted(f"caption {i}" for i in range(10) if i != 3)
    assert all(s["json"]["run_id"] == "r1" for s in samples)


def test_staged_features_are_written_in_row_groups_and_none_is_lost(tmp_path, monkeypatch):
    """The driver stages feature rows in Parquet row groups of ROW_GROUP_ROWS (fewer, larger
    writes); the rows left over at the end are written when the sink closes."""
    monkeypatch.setattr(sinks, "ROW_GROUP_ROWS", 10)
    store = Store(str(tmp_path / "store"))
    fps = {k: "fp" for k in (*MODALITIES, "sample", "all")}
    sink = RunSink(store, "r1", fps, tmp_path, shard_max=100)
    for k, part in enumerate(block(10) + block(10)):   # batches of 6, 4, 6, 4 rows; one rejected per block
        sink.add(dict(part, id=np.array([f"{k}-{i}" for i in part["id"]], dtype=object)))
    result = sink.close()
    table = pq.ParquetFile(result.staged[0])
    assert [table.metadata.row_group(k).num_rows for k in range(table.num_row_groups)] == [14, 4]   # the last 4 at close
    ids = table.read().column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 18 and result.samples_written == 18
