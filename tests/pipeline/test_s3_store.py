"""A store on S3 (moto's server on loopback): the writer lease, and a full run whose Delta tables,
WebDataset shards and run records all live in the bucket, read back with their own libraries."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pytest
import ray
import yaml
from deltalake import DeltaTable
from webdataset.tariterators import group_by_keys, tar_file_expander

from core.config import ConfigError, load_config
from pipeline.demo import make_demo
from core.lease import S3Lease
from pipeline.runner import run
from core.store import Store, StoreBusy

BUCKET = "mmpipe-test"
MMPIPE = str(Path(sys.executable).parent / "mmpipe")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """moto in server mode on loopback, with the AWS_* variables every client here (pyarrow,
    deltalake, boto3, subprocesses, Ray workers) reads.

    The server runs in its own process, as S3 would: served from a thread of the writing
    process (``ThreadedMotoServer``), pyarrow's multipart shard uploads stall for minutes."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            mp.delenv("AWS_PROFILE", raising=False)
            _wait_until_up(port)
            boto3.client("s3").create_bucket(Bucket=BUCKET)
            yield env
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_until_up(port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def keys(prefix: str) -> list[str]:
    listing = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in listing.get("Contents", []))


# -- the writer lease --------------------------------------------------------------------------
def test_second_writer_is_refused_until_the_first_releases(s3):
    store = Store(f"s3://{BUCKET}/lease-a")
    with store.lock("run-one"):
        assert keys("lease-a/") == ["lease-a/_lock.json"]
        with pytest.raises(StoreBusy, match="run run-one"):
            with Store(f"s3://{BUCKET}/lease-a").lock("run-two"):
                pass
    assert keys("lease-a/") == []
    with store.lock("run-two"):
        pass


def test_expired_lease_is_taken_over_and_the_dead_holder_cannot_delete_it(s3):
    uri = f"s3://{BUCKET}/lease-b/_lock.json"
    dead = S3Lease(uri, "crashed", lease_s=0.5)
    dead.acquire()
    dead._stop.set()                 # the holder dies: no more heartbeats, no release
    dead._thread.join()
    time.sleep(0.7)
    with S3Lease(uri, "next", lease_s=30):
        dead.release()               # a late release must not remove the new holder's lease
        body = json.loads(boto3.client("s3").get_object(Bucket=BUCKET, Key="lease-b/_lock.json")["Body"].read())
        assert body["run_id"] == "next"
    assert keys("lease-b/") == []


def test_heartbeat_keeps_a_live_lease(s3):
    uri = f"s3://{BUCKET}/lease-c/_lock.json"
    with S3Lease(uri, "alive", lease_s=0.6) as held:
        time.sleep(1.5)              # several lease periods: only the heartbeat keeps it
        with pytest.raises(Exception, match="run alive"):
            S3Lease(uri, "other", lease_s=0.6).acquire()
        assert not held.lost


def test_missing_bucket_is_a_one_line_user_error(s3, tmp_path):
    with pytest.raises(ConfigError, match="NoSuchBucket"):
        with Store("s3://no-such-bucket/store").lock("r"):
            pass
    manifest = make_demo(tmp_path / "data", n=2)
    config = tmp_path / "c.yaml"
    config.write_text("ray: {dashboard: false, num_cpus: 1}\n")
    proc = subprocess.run([MMPIPE, "run", str(config), "--input", str(manifest), "--store", "s3://no-such-bucket/s"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "NoSuchBucket" in proc.stderr and "Traceback" not in proc.stderr


# -- a whole run on S3 -------------------------------------------------------------------------
def tiny_config(folder: Path, manifest: Path, store: str):
    data = {"ray": {"dashboard": False, "progress_bars": False, "num_cpus": 2},
            "execution": {"batch_size": 8, "concurrency": 1, "shard_max_count": 4, "local_max_rows": 0},
            "stages": {"cleanup": {"image": {"params": {"blur_threshold": 5.0}}},
                       "features": {"image": {"encoder": "hist"}, "text": {"encoder": "hashed"},
                                    "audio": {"encoder": "logmel"}}}}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path, values={"source.path": str(manifest), "store": store})


def read_shards(env: dict, paths: list[str]) -> dict[str, dict]:
    fs = pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key=env["AWS_ACCESS_KEY_ID"],
                           secret_key=env["AWS_SECRET_ACCESS_KEY"], region=env["AWS_REGION"])
    samples = {}
    for path in paths:
        with fs.open_input_stream(f"{BUCKET}/store/{path}") as stream:
            for sample in group_by_keys(tar_file_expander([{"url": path, "stream": stream}])):
                samples[json.loads(sample["json"])["id"]] = sample
    return samples


@pytest.mark.slow
def test_run_twice_on_s3_and_read_everything_back(s3, tmp_path):
    manifest = make_demo(tmp_path / "data", n=12)
    input_ids = {json.loads(line)["id"] for line in manifest.read_text().splitlines()}
    cfg = tiny_config(tmp_path, manifest, f"s3://{BUCKET}/store")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        first = run(cfg, log=lambda s: None).record
        second = run(cfg, log=lambda s: None).record
    finally:
        ray.shutdown()
    assert first["counts"]["processed"] == len(input_ids)
    assert first["shard_writer"] == "actors"   # the stage actors wrote the shards to S3
    assert second["counts"]["processed"] == 0 and second["counts"]["unchanged"] == len(input_ids)

    opts = {**s3, "AWS_ALLOW_HTTP": "true"}
    feats = DeltaTable(f"s3://{BUCKET}/store/features", storage_options=opts).to_pyarrow_table()
    rejects = DeltaTable(f"s3://{BUCKET}/store/rejects", storage_options=opts).to_pyarrow_table()
    accepted = feats.filter(pc.field("aug") == 0)["id"].to_pylist()
    rejected = rejects["id"].to_pylist()
    assert accepted and rejected
    assert sorted(accepted + rejected) == sorted(input_ids)        # each id exactly once
    assert DeltaTable(f"s3://{BUCKET}/store/features", storage_options=opts).version() == first["versions"]["features"]

    shards = sorted(set(feats["shard"].to_pylist()))
    assert all(s.startswith(f"samples/{first['run_id']}/") for s in shards)
    samples = read_shards(s3, shards)
    assert set(samples) == set(accepted)
    some = samples[accepted[0]]
    assert json.loads(some["json"])["run_id"] == first["run_id"]

    runs = [k for k in keys("store/runs/") if k.endswith(".json")]
    assert runs == sorted(f"store/runs/{r['run_id']}.json" for r in (first, second))
    assert "store/_lock.json" not in keys("store/")


# -- deletion vectors ----------------------------------------------------------------------------
def test_deletion_vector_commits_on_s3_and_a_taken_version_is_refused(s3):
    """The hand-written commit of a deletion vector goes to S3 with create-if-absent: a version
    another writer took is a CommitConflict, not an overwrite."""
    import pyarrow as pa

    from core import deletion
    from core.schema import REJECTS_SCHEMA

    store = Store(f"s3://{BUCKET}/vectors")

    def commit(ids, delete, run):
        files = store.data_files("rejects", run)
        files.write(pa.Table.from_pylist([{"id": i, "stage": "s", "reason": "r", "run_id": run} for i in ids],
                                         schema=REJECTS_SCHEMA))
        return store.commit("rejects", files, pa.array(delete, pa.string()), run, vectors_from=0)

    commit([f"r{i}" for i in range(20)], [], "run-a")
    commit(["r3"], ["r3", "r4"], "run-b")
    dt = store.table(store.rejects_uri)
    assert deletion.deleted_rows(dt) and store.count("rejects") == 19
    assert sorted(store.read("rejects", columns=["id"])["id"].to_pylist()) == sorted(f"r{i}" for i in range(20) if i != 4)
    with pytest.raises(deletion.CommitConflict):
        deletion.commit(store.fs, store.path_of("rejects"), store.rejects_uri, dt.version(), [], {})
