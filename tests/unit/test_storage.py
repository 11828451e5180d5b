"""Pure parts of trainers.storage: URIs, paths and S3 options from the environment."""

from __future__ import annotations


import pyarrow.fs as pafs
import pytest

from trainers import storage
from trainers.storage import StorageError, filesystem, join

AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


@pytest.fixture(autouse=True)
def clean_aws_env(monkeypatch):
    for var in AWS_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize(
    ("base", "parts", "expected"),
    [
        ("s3://bucket/runs", ("a", "b.txt"), "s3://bucket/runs/a/b.txt"),
        ("s3://bucket/runs/", ("/a/", "/b/"), "s3://bucket/runs/a/b"),
        ("s3://bucket", ("x//y",), "s3://bucket/x/y"),
        ("s3://bucket/", (), "s3://bucket"),
        ("file:///tmp/store/", ("m",), "file:///tmp/store/m"),
        ("/tmp/store", ("m", "", "n"), "/tmp/store/m/n"),
        ("/", ("x",), "/x"),
        ("relative/dir", ("x",), "relative/dir/x"),
        ("~/runs", ("x",), "~/runs/x"),
    ],
)
def test_join(base, parts, expected):
    assert join(base, *parts) == expected


def test_filesystem_s3_strips_scheme_for_ray():
    fs, path = filesystem("s3://bucket/some/prefix/")
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == "bucket/some/prefix"
    assert filesystem("s3://bucket")[1] == "bucket"


def test_s3_filesystem_pickles_for_ray_workers(monkeypatch):
    import pickle

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:8333")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    fs, _ = filesystem("s3://bucket/p")
    assert pickle.loads(pickle.dumps(fs)) == fs


@pytest.mark.parametrize("uri", ["/tmp/a/b", "file:///tmp/a/b", "file://localhost/tmp/a/b", "/tmp/a//b/"])
def test_filesystem_local_absolute(uri):
    fs, path = filesystem(uri)
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == "/tmp/a/b"


def test_filesystem_local_expands_home_and_relative(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert filesystem("~/runs")[1] == str(tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    assert filesystem("rel/x")[1] == str(tmp_path / "rel" / "x")


@pytest.mark.parametrize("uri", ["gs://bucket/x", "hdfs://nn/x", "s3:/bucket/x", "s3://", "s3:///x",
                                 "file://otherhost/x"])
def test_filesystem_rejects_bad_uris(uri):
    with pytest.raises(StorageError) as info:
        filesystem(uri)
    assert uri in str(info.value)
    assert info.value.hint


def test_s3_options_from_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:8333")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    opts = storage._s3_options("s3://b/p")
    assert opts["endpoint_override"] == "127.0.0.1:8333"
    assert opts["scheme"] == "http"
    assert opts["region"] == "us-east-1"
    assert (opts["access_key"], opts["secret_key"]) == ("AKIDEXAMPLE", "s3cr3t-value")
    assert "session_token" not in opts


def test_s3_options_service_endpoint_and_region_precedence(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://ignored:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3.example.com")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    opts = storage._s3_options("s3://b")
    assert (opts["endpoint_override"], opts["scheme"]) == ("s3.example.com", "https")
    assert opts["region"] == "eu-west-1"
    assert "access_key" not in opts  # left to pyarrow's default chain (profiles, IAM roles)
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    assert storage._s3_options("s3://b")["region"] == "ap-south-1"


def test_s3_options_without_endpoint_means_aws(monkeypatch):
    opts = storage._s3_options("s3://b")
    assert "endpoint_override" not in opts and "scheme" not in opts


@pytest.mark.parametrize("endpoint", ["127.0.0.1:8333", "ftp://host:1", "http://host:1/path", "http://host:notaport"])
def test_bad_endpoint_is_a_storage_error(monkeypatch, endpoint):
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    with pytest.raises(StorageError, match="AWS_ENDPOINT_URL"):
        filesystem("s3://b/p")


def test_bad_endpoint_error_names_the_variable_and_hides_userinfo(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "ftp://user:pw-in-url@host:1")
    with pytest.raises(StorageError) as info:
        filesystem("s3://b/p")
    assert "AWS_ENDPOINT_URL_S3" in str(info.value)
    assert "pw-in-url" not in str(info.value)


def test_half_credentials_is_a_storage_error(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    with pytest.raises(StorageError, match="AWS_SECRET_ACCESS_KEY"):
        filesystem("s3://b/p")


def test_error_text_redacts_secrets(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-key")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-value")
    err = StorageError("s3://b/p", "saw very-secret-key", "and session-token-value")
    for text in (str(err), repr(err), err.message, err.hint):
        assert "very-secret-key" not in text and "session-token-value" not in text
    assert "s3://b/p" in str(err)


def test_storage_imports_only_stdlib_and_pyarrow():
    import ast
    import sys

    tree = ast.parse(open(storage.__file__).read())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    assert roots - {"pyarrow", "__future__", "trainers"} <= set(sys.stdlib_module_names)
    # its one import of this project is itself stdlib-only
    from trainers import secrets_env

    tree = ast.parse(open(secrets_env.__file__).read())
    own = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert own - {"__future__"} <= set(sys.stdlib_module_names)
