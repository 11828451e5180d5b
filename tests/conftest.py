"""Session-wide real services for the tests (no mocks): a SeaweedFS S3 server on 127.0.0.1."""

from __future__ import annotations

import uuid

import pytest

from tests.fixtures.s3 import S3Server, make_bucket, start_seaweedfs


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> str:
    """AWS_* variables pointing at the session's server; yields `s3://<fresh bucket>/runs`."""
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    for var, value in s3_server.env().items():
        monkeypatch.setenv(var, value)
    bucket = make_bucket(s3_server, f"test-{uuid.uuid4().hex[:12]}")
    yield f"{bucket}/runs"
