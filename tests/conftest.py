"""Shared fixtures: one Ray instance per test module that asks for it (Ray's
ray_start_regular_shared), shut down after the module so Ray-free tests stay Ray-free. And the
session ends with ``os._exit`` once pytest has reported (see ``pytest_unconfigure``)."""
from __future__ import annotations

import os
import sys

import pytest

EXIT_STATUS = pytest.StashKey[int]()

os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="module")
def ray_session():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Exit with pytest's status before the interpreter tears down its native libraries. Ray's GCS
    client and gRPC threads outlive ``ray.shutdown()`` and deltalake keeps a tokio runtime; in CI
    the process once died with SIGSEGV in that teardown after "266 passed", and make took the
    crash for a failure. Everything the suite reports has been written by now."""
    if EXIT_STATUS in config.stash:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(config.stash[EXIT_STATUS])
