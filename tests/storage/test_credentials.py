"""Credentials inside a root URL (``s3://key:secret@bucket``, ``http://user:pw@host``) are refused with a message
that does not show them, in storage calls and at config load, before a run directory gets its config.yaml."""

from __future__ import annotations

import pytest

from pipeline import storage
from pipeline.config import DataConfig, DomainConfig

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
URLS = [f"s3://AKIAEXAMPLE:{SECRET}@shards/demo", f"http://user:{SECRET}@127.0.0.1:9/shards",
        f"https://{SECRET}@example.org/shards", f"gs://user:{SECRET}@bucket/shards"]


@pytest.mark.parametrize("url", URLS)
def test_storage_refuses_credentials_in_urls(url, caplog):
    caplog.set_level("DEBUG")
    calls = [lambda: storage.read_bytes(storage.join(url, "manifest.json")),
             lambda: storage.open_stream(storage.join(url, "a.tar")),
             lambda: storage.read_range(storage.join(url, "a.tar"), 0, 10),
             lambda: storage.exists(storage.join(url, "a.tar"))]
    if not url.startswith("http"):
        calls.append(lambda: storage.write_bytes(storage.join(url, "x"), b"1"))
    for call in calls:
        with pytest.raises(storage.StorageError, match=r"<redacted>@.*carries credentials .*AWS_ACCESS_KEY_ID") as e:
            call()
        assert SECRET not in str(e.value) and "AKIAEXAMPLE" not in str(e.value)
    assert SECRET not in caplog.text
    assert storage.redact_url(url).count("<redacted>@") == 1 and SECRET not in storage.redact_url(url)


def test_a_container_at_account_is_not_a_credential():
    u = "abfs://container@account.dfs.core.windows.net/shards"  # adlfs names containers this way
    assert not storage.has_credentials(u) and storage.redact_url(u) == u
    assert storage.has_credentials("abfs://container:key@account.dfs.core.windows.net/shards")
    assert storage.has_credentials(f"https://{SECRET}@example.org/x")  # a token as the user part is a credential
    assert not storage.has_credentials("/data/user@host/shards") and not storage.has_credentials("s3://b/k@v")


def test_config_refuses_credentials_in_roots():
    with pytest.raises(ValueError, match=r"data.root='s3://<redacted>@shards/demo' carries credentials") as e:
        DataConfig(root=URLS[0])
    assert SECRET not in str(e.value)
    with pytest.raises(ValueError, match=r"data.domains\[rna\].root='http://<redacted>@127.0.0.1:9/shards'") as e:
        DataConfig(domains=(DomainConfig("rna", root=URLS[1]),))
    assert SECRET not in str(e.value)
    assert DataConfig(root="s3://shards/demo").root == "s3://shards/demo"  # a plain URL is fine


def test_a_run_with_credentials_in_its_root_stops_before_saving_anything(tmp_path, capsys):
    from training.run import main

    run_dir = tmp_path / "run"
    code = main(["configs/demo.yaml", f"data.root={URLS[0]}", f"trainer.run_dir={run_dir}"])
    err = capsys.readouterr().err
    assert code == 2 and "carries credentials" in err and SECRET not in err
    assert not run_dir.exists()  # no config.yaml (nor anything else) written
