"""The CLI's error contract: a user error is exactly one ``mmpipe: error: ...`` line on stderr and
exit 2; a malformed command line is click's usage message and exit 2; never a traceback.

Each row runs the real ``mmpipe`` in a subprocess. None of them may start Ray: every error is
caught before it, which keeps the whole table to a few seconds per row at most.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ERROR = "mmpipe: error: "
USAGE = "Usage: mmpipe"


def user_error(name: str, argv: list[str], message: str):
    return pytest.param(argv, ERROR + message, id=name)


def usage_error(name: str, argv: list[str], message: str):
    return pytest.param(argv, USAGE + r".*Error: " + message, id=name)


CASES = [
    user_error("run-missing-config", ["run", "nothere.yaml"], r"config file not found: nothere\.yaml$"),
    user_error("run-bad-yaml", ["run", "bad.yaml"], r"config bad\.yaml is not valid YAML"),
    user_error("run-unknown-key", ["run", "unknown.yaml"], r"unknown config key 'bogus_key'$"),
    user_error("run-unknown-set-key", ["run", "ok.yaml", "--input", "m.jsonl", "--set", "nosuch.key=1"],
               r"unknown config key 'nosuch'$"),
    user_error("run-missing-input", ["run", "ok.yaml", "--input", "nothere.jsonl"], r"manifest not found: nothere\.jsonl$"),
    user_error("run-unknown-retry-reason", ["run", "ok.yaml", "--input", "m.jsonl", "--retry-rejects", "http_timeout,http_timout"],
               r"--retry-rejects: unknown reject reason\(s\) http_timout; "),
    user_error("train-missing-store", ["train", "ok.yaml", "--store", "empty"],
               r"no features table at \S*/empty/features; run `mmpipe run` first$"),
    user_error("train-unknown-fusion", ["train", "ok.yaml", "--fusion", "nosuch"],
               r"unknown fusion 'nosuch'; known: attention, concat, .*transformer$"),
    user_error("train-unknown-modality", ["train", "ok.yaml", "--modalities", "image,smell"],
               r"modalities must be .*got \['image', 'smell'\]$"),
    user_error("train-empty-modalities", ["train", "ok.yaml", "--modalities", ","], r"modalities must be a non-empty"),
    user_error("train-missing-version", ["train", "ok.yaml", "--set", "training.features_version=7"],
               r"features table at \S+ has no version 7 \(versions 0\.\.0\)$"),
    user_error("compare-unknown-modality", ["train", "ok.yaml", "--compare", "--set", "training.modalities=[smell]"],
               r"modalities must be .*got \['smell'\]$"),
    user_error("predict-no-model", ["predict", "ok.yaml", "--model", "nomodel", "--input", "m.jsonl", "--out", "p.csv"],
               r"no trained model at nomodel \(metrics\.json missing\)$"),
    user_error("predict-bad-suffix", ["predict", "ok.yaml", "--model", "model", "--input", "m.jsonl", "--out", "p.txt"],
               r"unknown output type '\.txt'"),
    user_error("report-missing-store", ["report", "nostore"], r"store not found: nostore$"),
    user_error("report-missing-version", ["report", "store", "--version", "99"],
               r"no table of store has a version 99 \(versions: 0\)$"),
    user_error("submit-unreachable", ["submit", "ok.yaml", "--address", "{closed}"],
               r"cannot reach the Ray cluster at http://127\.0\.0\.1:\d+: "),
    user_error("status-unreachable", ["status", "raysubmit_1", "--address", "{closed}"], r"cannot reach the Ray cluster"),
    user_error("logs-unreachable", ["logs", "raysubmit_1", "--address", "{closed}"], r"cannot reach the Ray cluster"),
    user_error("stop-unreachable", ["stop", "raysubmit_1", "--address", "{closed}"], r"cannot reach the Ray cluster"),
    user_error("status-bad-address", ["status", "raysubmit_1", "--address", "http://127.0.0.1:notaport"],
               r"cannot reach the Ray cluster at http://127\.0\.0\.1:notaport: "),
    user_error("status-no-address", ["status", "raysubmit_1"], r"no cluster address"),
    user_error("status-bare-host-port", ["status", "raysubmit_1", "--address", "{closed_bare}"],
               r"cannot reach the Ray cluster at http://127\.0\.0\.1:\d+: "),
    usage_error("unknown-command", ["frobnicate"], r"No such command 'frobnicate'"),
    usage_error("run-no-config", ["run"], r"Missing argument 'config'"),
    usage_error("run-bad-option", ["run", "ok.yaml", "--bogus"], r"No such option: --bogus"),
    usage_error("predict-missing-option", ["predict", "ok.yaml"], r"Missing option '--model'"),
    usage_error("report-bad-value", ["report", "store", "--version", "x"], r"Invalid value"),
]


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(folder: Path) -> None:
    """Tiny inputs: configs, a manifest, a store with a one-version features table, a model dir."""
    from deltalake import write_deltalake
    import pyarrow as pa

    (folder / "ok.yaml").write_text("name: t\nstore: store\ntraining: {engine: local}\n")
    (folder / "bad.yaml").write_text("name: [unclosed\n")
    (folder / "unknown.yaml").write_text("name: t\nbogus_key: 1\n")
    (folder / "m.jsonl").write_text('{"id": "a", "text": "hello there", "label": "x"}\n')
    (folder / "empty").mkdir()
    write_deltalake(str(folder / "store" / "features"), pa.table({"id": ["a"], "label": ["x"], "split": ["train"]}))
    (folder / "model").mkdir()
    (folder / "model" / "metrics.json").write_text("{}")


@pytest.mark.parametrize("argv, expected", CASES)
def test_error_is_one_line_or_usage_and_exit_2(tmp_path, argv, expected):
    _inputs(tmp_path)
    closed = f"http://127.0.0.1:{_closed_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    argv = [a.replace("{closed}", closed).replace("{closed_bare}", closed.removeprefix("http://")) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *argv],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    shown = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stdout + proc.stderr, shown
    assert proc.returncode == 2, shown
    if expected.startswith(ERROR):
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and re.match(expected, lines[0]), shown
    else:
        assert proc.stderr.startswith(USAGE) and re.match(expected, proc.stderr, re.S), shown
