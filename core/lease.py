"""A writer lease on S3: one small JSON object, created only if absent (conditional put), renewed
by a heartbeat thread, and taken over (conditional on its ETag) once its holder stopped renewing it.

A local store uses an flock instead (``Store.lock``); the kernel releases it when a run dies. An
object store has no such thing, so a crashed run's lease simply expires after ``lease_s``.
Expiry is judged on the reader's clock: keep clocks within ``lease_s / 3`` of each other.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)

LEASE_S = float(os.environ.get("MMPIPE_LOCK_LEASE_S", "120"))
_LOST = ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404", "412", "409")


class LeaseHeld(RuntimeError):
    """Someone else holds a live lease; the message names the holder."""


class LeaseUnavailable(RuntimeError):
    """The lock object cannot be written at all (no bucket, no credentials, no endpoint)."""


@dataclass
class LeaseInfo:
    run_id: str
    holder: str
    expires: float      # epoch seconds
    lease_s: float

    def describe(self) -> str:
        left = max(0.0, self.expires - time.time())
        return f"run {self.run_id} ({self.holder}, lease expires in {left:.0f} s)"


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


class S3Lease:
    """``with S3Lease("s3://bucket/store/_lock.json", run_id): ...``"""

    def __init__(self, uri: str, run_id: str, lease_s: float = LEASE_S, client=None):
        if not uri.startswith("s3://"):
            raise ValueError(f"not an s3:// URI: {uri}")
        self.bucket, _, self.key = uri[len("s3://"):].partition("/")
        self.run_id, self.lease_s = run_id, lease_s
        self._client = client
        self.etag: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def client(self):
        if self._client is None:
            self._client = _client()
        return self._client

    # -- public -------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the lease or raise ``LeaseHeld``; an expired lease is taken over. Raises
        ``LeaseUnavailable`` (one line) when the store cannot be reached or written."""
        try:
            from botocore.exceptions import BotoCoreError, ClientError
        except ImportError:
            raise LeaseUnavailable("an s3:// store needs boto3 for its writer lease: pip install boto3") from None

        try:
            self._acquire()
        except ClientError as exc:
            err = exc.response.get("Error", {})
            raise LeaseUnavailable(f"s3://{self.bucket}/{self.key}: {err.get('Code')}: {err.get('Message')}") from None
        except BotoCoreError as exc:
            raise LeaseUnavailable(f"s3://{self.bucket}/{self.key}: {exc}") from None
        self._thread = threading.Thread(target=self._heartbeat, name="mmpipe-lease", daemon=True)
        self._thread.start()

    def _acquire(self) -> None:
        for _ in range(3):
            try:
                self.etag = self._put(IfNoneMatch="*")
                break
            except self.client.exceptions.ClientError as exc:
                if _code(exc) not in _LOST:
                    raise
            current = self._read()
            if current is None:            # released between our put and our read: try again
                continue
            info, etag = current
            if info.expires > time.time():
                raise LeaseHeld(info.describe())
            try:
                self.etag = self._put(IfMatch=etag)
                log.warning("took over the expired store lease of %s", info.describe())
                break
            except self.client.exceptions.ClientError as exc:
                if _code(exc) not in _LOST:
                    raise
                # another writer took it over first; loop and report them
        else:
            raise LeaseHeld("another writer (the lease changed hands while we tried to take it)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.etag is None or self.lost:
            return
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except self.client.exceptions.ClientError as exc:
            if _code(exc) not in _LOST:
                raise
        self.etag = None

    def __enter__(self) -> "S3Lease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- internals ----------------------------------------------------------------------------
    def _info(self) -> LeaseInfo:
        return LeaseInfo(self.run_id, f"{socket.gethostname()} pid {os.getpid()}",
                         time.time() + self.lease_s, self.lease_s)

    def _put(self, **condition: str) -> str:
        body = json.dumps(asdict(self._info())).encode()
        return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body,
                                      ContentType="application/json", **condition)["ETag"]

    def _read(self) -> tuple[LeaseInfo, str] | None:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None
        return LeaseInfo(**json.loads(obj["Body"].read())), obj["ETag"]

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.etag = self._put(IfMatch=self.etag)
            except self.client.exceptions.ClientError as exc:
                if _code(exc) in _LOST:
                    self.lost = True
                    log.error("lost the store lease of run %s: another writer took it over", self.run_id)
                    return
                log.warning("could not renew the store lease (will retry): %s", exc)


def _client():
    """A boto3 S3 client; endpoint, region and credentials from the usual AWS_* variables."""
    import boto3

    return boto3.client("s3", region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))
