"""Converter output straight to S3 (a real moto server on loopback), then verified from there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.storage_servers import MotoServer

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(240)


def test_convert_to_s3_uploads_manifest_last_and_verifies(tmp_path, demo_raw):
    raw = tmp_path / "raw" / "metabolite"
    raw.mkdir(parents=True)
    shutil.copy(demo_raw / "metabolite" / "metabolites_ccd_hmdb.sdf", raw)
    with MotoServer() as moto:
        client = moto.boto3_client()
        client.create_bucket(Bucket="shards")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(moto.env(), AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null",
                   AWS_EC2_METADATA_DISABLED="true")
        url = "s3://shards/demo/v1"
        r = subprocess.run([sys.executable, "-m", "shards_tools.convert", str(tmp_path / "raw"), url,
                            "--staging", str(tmp_path / "staging"), "--no-progress", "--shard-size-mb", "0.3",
                            "--keep-work"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=200)
        assert r.returncode == 0, r.stderr
        man = json.loads(client.get_object(Bucket="shards", Key="demo/v1/manifest.json")["Body"].read())
        staged = tmp_path / "staging"
        for rel in [s["path"] for s in man["shards"]] + ["index/metabolite.parquet", "rejected.jsonl"]:
            body = client.get_object(Bucket="shards", Key=f"demo/v1/{rel}")["Body"].read()
            assert body == (staged / rel).read_bytes(), rel
        spool = next((staged / ".work").glob("*.json")).name
        with pytest.raises(client.exceptions.ClientError):  # the local cache folder is not uploaded
            client.head_object(Bucket="shards", Key=f"demo/v1/.work/{spool}")
        v = subprocess.run([sys.executable, "-m", "shards_tools.inspect", url, "--verify", "--json"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=200)
        assert v.returncode == 0, v.stderr + v.stdout
        info = json.loads(v.stdout)
        assert info["verify"]["ok"] and info["domains"]["metabolite"]["samples"] == 300
        assert moto.secret_key not in r.stdout + r.stderr + v.stdout + v.stderr
