# ============================================================================
# Storage backends: a real moto S3 server, and the store_url fixture that runs
# a test against both the local and the S3 store.
# ============================================================================
import uuid

import boto3
import pytest

from s3server import MotoServer

# Fixture modules of each test area (one line each).
pytest_plugins = [
    "core_fixtures",
    "sync_fixtures",
    "mount_fixtures",
    "lineage_fixtures",
    "workspace_fixtures",
    "web_fixtures",
]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server process for the whole session (``.endpoint_url``).

    Also points the session's AWS settings at fake credentials, away from the
    developer's own ~/.aws configuration."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "COMMITFS_S3_ENDPOINT_URL"):
            mp.delenv(var, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
        server = MotoServer()
        try:
            server.start()
            yield server
        finally:
            server.stop()


@pytest.fixture
def s3_url(s3_server, monkeypatch):
    """``s3://BUCKET/repo`` in a fresh bucket; the endpoint is set in the
    environment so that ``open_store(url)`` needs no options."""
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    client.create_bucket(Bucket=bucket)
    client.close()
    monkeypatch.setenv("COMMITFS_S3_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    return f"s3://{bucket}/repo"


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path):
    """A URL for ``open_store``: a fresh directory, then a fresh S3 prefix."""
    if request.param == "local":
        return str(tmp_path / "repo")
    return request.getfixturevalue("s3_url")


# ============================================================================
# (end of storage backend fixtures)
# ============================================================================


@pytest.fixture
def small_split(monkeypatch):
    """Split-tree thresholds small enough for a few hundred entries to make several levels."""
    from commitfs.model import splittree
    for name, value in (("SPLIT_ENTRIES", 32), ("LEAF_MIN", 4), ("LEAF_BITS", 2), ("LEAF_MAX", 16),
                        ("INDEX_MIN", 2), ("INDEX_BITS", 1), ("INDEX_MAX", 6)):
        monkeypatch.setattr(splittree, name, value)
