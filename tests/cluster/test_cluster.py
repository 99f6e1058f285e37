"""A real two-node Ray cluster on loopback: `mmpipe submit --wait` through the Jobs API, then the
outputs and the accounting invariant. Run with `pytest -m cluster tests/cluster`.

Each node is a `ray start --block` in its own session with its own temp dir and explicit ports,
so tearing down kills exactly these processes (never `ray stop`, which would also stop any
other Ray on the machine)."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest
import yaml
from deltalake import DeltaTable

from pipeline.demo import make_demo

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 180
JOB_TIMEOUT_S = 420


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def node_cmd(temp_dir: str, head: bool, gcs_port: int, dashboard_port: int = 0) -> list[str]:
    agent, agent_grpc, env_agent, metrics, client, nm, om = free_ports(7)
    cmd = [str(BIN / "ray"), "start", "--block", "--num-cpus=1", "--node-ip-address=127.0.0.1",
           f"--temp-dir={temp_dir}", "--object-store-memory=150000000", "--disable-usage-stats",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
           f"--node-manager-port={nm}", f"--object-manager-port={om}"]
    if head:
        cmd += ["--head", f"--port={gcs_port}", f"--dashboard-port={dashboard_port}",
                "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--ray-client-server-port={client}"]
    else:
        cmd += [f"--address=127.0.0.1:{gcs_port}"]
    return cmd


def wait_for_nodes(dashboard: str, n: int, procs: list[subprocess.Popen], token: str) -> None:
    """Poll the state API (with the cluster's token) until ``n`` nodes are alive."""
    import urllib.request

    deadline = time.monotonic() + START_TIMEOUT_S
    request = urllib.request.Request(f"{dashboard}/api/v0/nodes?limit=100", headers={"Authorization": f"Bearer {token}"})
    while True:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"`ray start` exited with {p.returncode}")
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                nodes = json.loads(resp.read())["data"]["result"]["result"]
            if sum(1 for x in nodes if x.get("state") == "ALIVE") >= n:
                return
        except (OSError, ValueError, KeyError):  # the dashboard is not up yet: keep polling until the deadline
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"cluster did not reach {n} nodes in {START_TIMEOUT_S} s")
        time.sleep(2)


def stop_cluster(procs: list[subprocess.Popen], temp_dirs: list[str]) -> None:
    """SIGTERM then SIGKILL each node's process group, then any straggler whose command line
    names one of our temp dirs (workers started by our raylets)."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
    for pid in _pids_mentioning(temp_dirs):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _pids_mentioning(needles: list[str]) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(n in cmdline for n in needles):
                pids.append(int(entry.name))
    return pids


def _client_env(token: str | None, home: str) -> dict[str, str]:
    """A client's environment: with the cluster's token, or without any (and no ~/.ray token file)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env["HOME"] = home
    if token is not None:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return env


@pytest.fixture(scope="module")
def token() -> str:
    return secrets.token_hex(16)


@pytest.fixture(scope="module")
def cluster(token):
    """Two nodes with Ray's token authentication on (RAY_AUTH_MODE=token), as docs/cluster.md runs them."""
    gcs_port, dashboard_port = free_ports(2)
    temp_dirs = [tempfile.mkdtemp(prefix="/tmp/mmc") for _ in range(2)]   # short: unix socket paths
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_DEDUP_LOGS": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env.pop("RAY_ADDRESS", None)
    procs: list[subprocess.Popen] = []
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    try:
        for head, temp_dir in ((True, temp_dirs[0]), (False, temp_dirs[1])):
            procs.append(subprocess.Popen(node_cmd(temp_dir, head, gcs_port, dashboard_port), env=env,
                                          start_new_session=True, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
            if head:
                wait_for_nodes(dashboard, 1, procs, token)
        wait_for_nodes(dashboard, 2, procs, token)
        yield dashboard
    finally:
        stop_cluster(procs, temp_dirs)
        for temp_dir in temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.cluster
def test_a_client_without_the_token_is_refused(cluster, tmp_path):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "config.yaml").write_text("name: x\n")
    for env in (_client_env(None, str(tmp_path)),
                {**_client_env("not-the-token", str(tmp_path))}):
        proc = subprocess.run([str(BIN / "mmpipe"), "submit", "config.yaml", "--address", cluster, "--input", "m.jsonl",
                               "--store", str(tmp_path / "s")], cwd=job_dir, env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mmpipe: error:") and "Traceback" not in proc.stderr
        assert "auth" in lines[0].lower() or "401" in lines[0] or "403" in lines[0], lines[0]


@pytest.mark.cluster
def test_submit_wait_runs_the_pipeline_on_two_nodes(cluster, token, tmp_path):
    job_dir = tmp_path / "job"                    # uploaded as the working dir
    manifest = make_demo(job_dir / "inputs", n=16)
    (job_dir / "config.yaml").write_text(yaml.safe_dump({
        "ray": {"progress_bars": False},
        "execution": {"batch_size": 8, "concurrency": 1},
        "stages": {"cleanup": {"image": {"params": {"blur_threshold": 5.0}}},
                   "features": {"image": {"encoder": "hist"}, "text": {"encoder": "hashed"},
                                "audio": {"encoder": "logmel"}}}}))
    store = tmp_path / "store"                    # local path: both nodes share this filesystem
    started = time.monotonic()
    proc = subprocess.run([str(BIN / "mmpipe"), "submit", "config.yaml", "--address", cluster,
                           "--input", "inputs/manifest.jsonl", "--store", str(store), "--wait",
                           "--timeout", str(JOB_TIMEOUT_S)],
                          cwd=job_dir, env=_client_env(token, str(tmp_path)), capture_output=True, text=True,
                          timeout=JOB_TIMEOUT_S + 60)
    print(f"submit --wait took {time.monotonic() - started:.1f} s\n{proc.stderr[-3000:]}")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    job_id = proc.stdout.splitlines()[0]
    assert job_id.startswith("raysubmit_")
    assert "SUCCEEDED" in proc.stderr and "RUNNING" in proc.stderr       # status changes were shown
    assert "counts:" in proc.stdout                                       # the job's own log, tailed

    status = subprocess.run([str(BIN / "mmpipe"), "status", job_id, "--address", cluster],
                            env=_client_env(token, str(tmp_path)), capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout

    input_ids = {json.loads(line)["id"] for line in manifest.read_text().splitlines()}
    feats = DeltaTable(str(store / "features")).to_pyarrow_table(columns=["id", "aug"])
    accepted = feats.filter(pc.field("aug") == 0)["id"].to_pylist()
    rejected = DeltaTable(str(store / "rejects")).to_pyarrow_table(columns=["id"])["id"].to_pylist()
    assert accepted and rejected
    assert sorted(accepted + rejected) == sorted(input_ids)      # each input id exactly once
    (record_path,) = (store / "runs").glob("*.json")
    record = json.loads(record_path.read_text())
    assert record["cluster"]["num_cpus"] == 2                     # both nodes' CPUs were in the job
    assert list((store / "samples").rglob("*.tar"))
    # The token is a secret: never printed, never in what the run stored.
    assert token not in proc.stdout + proc.stderr + status.stdout + status.stderr
    assert not [p for p in store.rglob("*") if p.is_file() and p.suffix in (".json", ".yaml", ".txt", ".log")
                and token in p.read_text(errors="replace")]
