"""`mmpipe submit` without a cluster: what it would send, and one-line errors."""
from __future__ import annotations

import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.jobs import JobError, build_job, forwarded_env, resolve_address

MMPIPE = str(Path(sys.executable).parent / "mmpipe")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "c.yaml").write_text("ray: {dashboard: false}\n")
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "m.jsonl").write_text('{"text": "hi"}\n')
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "big.jsonl").write_text('{"text": "hi"}\n')
    return tmp_path


def test_entrypoint_uses_paths_the_job_sees(workdir):
    spec = build_job(workdir / "configs" / "c.yaml", workdir, input=str(workdir / "inputs" / "m.jsonl"),
                     store="s3://bucket/store", overrides=["seed=3"], pip=["mmpipe==0.1.0"], env={"A": "1"})
    assert shlex.split(spec.entrypoint) == ["mmpipe", "run", "configs/c.yaml", "--input", "inputs/m.jsonl",
                                            "--store", "s3://bucket/store", "--set", "seed=3"]
    env = spec.runtime_env
    assert env["working_dir"] == str(workdir.resolve())
    assert {".venv/", "store/", "data/"} <= set(env["excludes"])
    assert env["pip"] == ["mmpipe==0.1.0"] and env["env_vars"] == {"A": "1"}
    assert spec.notes == []


def test_paths_not_uploaded_stay_absolute_with_a_note(workdir):
    spec = build_job(workdir / "configs" / "c.yaml", workdir, input=str(workdir / "data" / "big.jsonl"),
                     store="out/store")
    args = shlex.split(spec.entrypoint)
    assert args[args.index("--input") + 1] == str((workdir / "data" / "big.jsonl").resolve())
    assert Path(args[args.index("--store") + 1]).is_absolute()
    assert len(spec.notes) == 2


def test_config_must_travel_with_the_working_dir(workdir, tmp_path_factory):
    with pytest.raises(JobError, match="inside the uploaded working dir"):
        build_job(workdir / "configs" / "c.yaml", tmp_path_factory.mktemp("elsewhere"))
    (workdir / "data" / "c.yaml").write_text("{}\n")
    with pytest.raises(JobError, match="excluded"):
        build_job(workdir / "data" / "c.yaml", workdir)


def test_address_and_env_resolution(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(JobError, match="no cluster address"):
        resolve_address(None)
    monkeypatch.setenv("RAY_ADDRESS", "http://b:8265")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://a:8265")
    assert resolve_address(None) == "http://a:8265"
    assert resolve_address("http://c:8265") == "http://c:8265"
    assert resolve_address("head.local:8265") == "http://head.local:8265"   # bare HOST:PORT: the job server
    assert resolve_address("[::1]:8265") == "http://[::1]:8265"
    assert resolve_address("ray://head:10001") == "ray://head:10001" and resolve_address("auto") == "auto"
    monkeypatch.setenv("MMPIPE_T", "v")
    assert forwarded_env(["MMPIPE_T", "X=1"]) == {"MMPIPE_T": "v", "X": "1"}
    with pytest.raises(JobError):
        forwarded_env(["MMPIPE_NOT_SET_ANYWHERE"])


def test_unreachable_cluster_is_one_line_and_non_zero(workdir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]          # closed once we leave: nothing listens there
    for args in (["submit", "configs/c.yaml", "--input", "inputs/m.jsonl"], ["status", "raysubmit_x"],
                 ["logs", "raysubmit_x"], ["stop", "raysubmit_x"]):
        proc = subprocess.run([MMPIPE, *args, "--address", f"http://127.0.0.1:{port}"], cwd=workdir,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0, args
        assert proc.stderr.strip().count("\n") == 0 and "cannot reach the Ray cluster" in proc.stderr, proc.stderr
