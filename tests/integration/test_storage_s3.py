"""trainers.storage against a real SeaweedFS S3 server on 127.0.0.1 and a local directory."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from trainers import storage
from trainers.storage import StorageError, join

pytestmark = pytest.mark.integration


@pytest.fixture(params=["s3", "local", "file-uri"])
def root(request, tmp_path) -> str:
    if request.param == "s3":
        return request.getfixturevalue("s3_env")
    if request.param == "local":
        return str(tmp_path / "store")
    return (tmp_path / "store").as_uri()


def _tree(base: Path) -> dict[str, bytes]:
    files = {
        "config.json": b'{"hidden_size": 8}',
        "weights/model-00001.bin": os.urandom(3 * 1024 * 1024 + 17),  # multipart on S3
        "weights/deep/nested/part.txt": "ünïcode\n".encode(),
        "empty.txt": b"",
    }
    for rel, data in files.items():
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(data)
    return files


def test_text_round_trip(root):
    uri = join(root, "run-1", "spec.yaml")
    assert storage.read_text(uri) is None
    assert not storage.exists(uri)
    storage.write_text(uri, "name: tiny\nlr: 1e-4 · ✓\n")
    assert storage.read_text(uri) == "name: tiny\nlr: 1e-4 · ✓\n"
    storage.write_text(uri, "replaced")
    assert storage.read_text(uri) == "replaced"
    assert storage.exists(uri) and storage.exists(join(root, "run-1"))
    storage.write_text(join(root, "run-1", "metrics.jsonl"), "{}\n")
    assert storage.list_dir(root) == ["run-1"]
    assert storage.list_dir(join(root, "run-1")) == ["metrics.jsonl", "spec.yaml"]
    assert storage.list_dir(join(root, "nothing-here")) == []
    storage.delete(uri)
    assert storage.read_text(uri) is None
    assert storage.list_dir(join(root, "run-1")) == ["metrics.jsonl"]
    storage.delete(uri)  # missing: no error
    storage.delete(join(root, "run-1"))
    assert not storage.exists(join(root, "run-1", "metrics.jsonl"))
    assert storage.list_dir(join(root, "run-1")) == []


def test_upload_and_download_dir(root, tmp_path):
    src = tmp_path / "src"
    files = _tree(src)
    model = join(root, "run-1", "model")
    storage.upload_dir(str(src), model)
    assert storage.list_dir(model) == ["config.json", "empty.txt", "weights"]
    assert storage.list_dir(join(model, "weights")) == ["deep", "model-00001.bin"]

    dest = tmp_path / "dest"
    storage.download_dir(model, str(dest))
    got = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert got == files

    storage.delete(model)
    assert not storage.exists(join(model, "config.json"))
    assert not storage.exists(model)  # SeaweedFS still lists its prefix for minutes
    assert storage.list_dir(model) == []
    assert storage.list_dir(join(root, "run-1")) == []
    storage.delete(model)  # gone (or a SeaweedFS phantom prefix): no error
    with pytest.raises(StorageError, match="no directory"):
        storage.download_dir(model, str(tmp_path / "dest2"))


def test_check_writable_passes(root):
    storage.check_writable(root)
    storage.check_writable(join(root, "not", "yet", "there"))
    leftovers = [n for n in storage.list_dir(root) if n.startswith(".write-probe")]
    assert leftovers == []


def _assert_no_secret(err: StorageError, secret: str) -> None:
    for text in (str(err), repr(err), err.message, err.hint or ""):
        assert secret not in text


def test_check_writable_missing_bucket(s3_env, s3_server):
    bucket = f"missing-{uuid.uuid4().hex[:10]}"
    with pytest.raises(StorageError) as info:
        storage.check_writable(f"s3://{bucket}/runs")
    err = info.value
    assert bucket in err.message and "does not exist" in err.message
    assert s3_server.endpoint in err.message
    assert "create" in err.hint
    _assert_no_secret(err, s3_server.secret_key)
    # and nothing created it behind our back (weed's -s3.autoCreateBucket is off)
    names = [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]
    assert bucket not in names


def test_check_writable_wrong_secret(s3_env, s3_server, monkeypatch):
    wrong = "wrong-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    with pytest.raises(StorageError) as info:
        storage.check_writable(s3_env)
    err = info.value
    assert "access denied" in err.message and "AWS_SECRET_ACCESS_KEY" in err.hint
    _assert_no_secret(err, wrong)
    _assert_no_secret(err, s3_server.secret_key)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(60)
def test_check_writable_unreachable_endpoint_fails_fast(s3_env, s3_server, monkeypatch):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        storage.check_writable(s3_env)
    elapsed = time.monotonic() - started
    err = info.value
    assert "cannot reach" in err.message and endpoint in err.message
    assert "AWS_ENDPOINT_URL" in err.hint
    _assert_no_secret(err, s3_server.secret_key)
    assert elapsed < 10, f"took {elapsed:.1f}s"  # generous: measured well under 1 s here


def test_local_check_writable_read_only(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can write to read-only directories")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(StorageError, match="permission denied"):
            storage.check_writable(str(ro / "runs"))
    finally:
        ro.chmod(0o700)


def test_local_check_writable_under_a_file(tmp_path):
    (tmp_path / "plain-file").write_text("x")
    with pytest.raises(StorageError) as info:
        storage.check_writable(str(tmp_path / "plain-file" / "runs"))
    assert "plain-file" in str(info.value)


def test_delete_bucket_root_empties_but_keeps_bucket(s3_env, s3_server):
    bucket_uri = s3_env.rsplit("/", 1)[0]
    storage.write_text(join(bucket_uri, "a", "x.txt"), "x")
    storage.write_text(join(bucket_uri, "top.txt"), "y")
    storage.delete(bucket_uri)
    assert storage.list_dir(bucket_uri) == []
    storage.check_writable(bucket_uri)  # the bucket is still there


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs `ss` (iproute2)")
def test_seaweedfs_listens_on_loopback_only(s3_server):
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    mine = [line.split() for line in out.splitlines() if f"pid={s3_server.pid}," in line]
    local_addresses = {fields[3] for fields in mine}
    assert local_addresses, out
    assert all(addr.startswith("127.0.0.1:") for addr in local_addresses), local_addresses
    ports = {int(addr.rsplit(":", 1)[1]) for addr in local_addresses}
    assert s3_server.ports["s3"] in ports
    assert not ports & set(range(10002, 20000)), "clashes with Ray's default worker ports"
