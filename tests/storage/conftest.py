"""Real servers on 127.0.0.1 for the storage tests: moto's S3 server (IAM auth on) and its objects."""

from __future__ import annotations

import random

import pytest

from pipeline import storage
from tests.storage.helpers import BUCKET, SIZES
from tests.storage_servers import MotoServer


@pytest.fixture(scope="session")
def moto():
    with MotoServer() as server:
        yield server


@pytest.fixture(scope="session")
def objects(moto) -> dict[str, bytes]:
    """Objects in s3://shards/data/, key -> bytes (seeded random content)."""
    rng = random.Random(1234)
    client = moto.boto3_client()
    client.create_bucket(Bucket=BUCKET)
    out = {}
    for i, n in enumerate(SIZES):
        key = f"data/obj-{i:02d}.tar"
        out[key] = rng.randbytes(n)
        client.put_object(Bucket=BUCKET, Key=key, Body=out[key])
    return out


@pytest.fixture
def s3_env(moto, objects, monkeypatch):
    """Credentials of the moto user in the environment, the endpoint in AWS_ENDPOINT_URL_S3, fresh clients/stats."""
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for k, v in moto.env().items():
        monkeypatch.setenv(k, v)
    storage.reset_clients()
    storage.stats.reset()
    yield moto
    storage.reset_clients()
