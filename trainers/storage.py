"""Run storage: local directories and S3-compatible object stores, through pyarrow.

Used by the launcher (pre-flight `check_writable`, writing `spec.yaml`) and by the Ray
workers (checkpoints, metrics, the final model), so it imports only the standard library
and pyarrow. A storage location is a URI: `s3://bucket/prefix`, `file:///abs/path`, or a
plain path (`~` and relative paths are expanded).

S3 settings come from the standard AWS variables, so any S3-compatible store works:
`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` (`http://host:port` or `https://...`; unset
means AWS itself), `AWS_REGION` / `AWS_DEFAULT_REGION` (default `us-east-1`),
`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`. Without keys in the
environment pyarrow's default chain looks further (`~/.aws`, `AWS_PROFILE`, instance
roles).

`filesystem(uri)` returns the `(pyarrow FileSystem, path)` pair that Ray Train's
`RunConfig(storage_filesystem=fs, storage_path=path)` expects: for S3 the path is
`bucket/prefix`, without `s3://` (Ray rejects the URI form together with a filesystem).

Nothing here caches a filesystem or logs its options: a filesystem object holds the
secret key, and error messages are scrubbed of it.
"""

from __future__ import annotations

import os
import re
import uuid
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import unquote, urlsplit

import pyarrow
import pyarrow.fs as pafs

__all__ = [
    "StorageError",
    "filesystem",
    "join",
    "write_text",
    "read_text",
    "exists",
    "list_dir",
    "delete",
    "upload_dir",
    "download_dir",
    "check_writable",
]

DEFAULT_REGION = "us-east-1"

# Ordinary I/O (checkpoints from a long run) rides out transient errors; the pre-flight
# probe must answer within seconds when the endpoint is wrong or down. On Linux the AWS SDK
# ignores request_timeout (pyarrow docs); connect_timeout and the attempts bound the wait.
_IO_CONNECT_TIMEOUT_S = 5.0
_IO_REQUEST_TIMEOUT_S = 60.0
_IO_MAX_ATTEMPTS = 5
_PROBE_CONNECT_TIMEOUT_S = 2.0
_PROBE_REQUEST_TIMEOUT_S = 10.0
_PROBE_MAX_ATTEMPTS = 2

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def _redact(text: str) -> str:
    for var in _SECRET_VARS:
        secret = os.environ.get(var)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


class StorageError(Exception):
    """Run storage is unreachable, missing or not writable; says which URI and what to do.

    `message` names the URI and the cause, `hint` the fix. Secrets from the environment
    never appear in either (they are replaced by `***`).
    """

    exit_code = 3

    def __init__(self, uri: str, problem: str, hint: str | None = None):
        self.uri = uri
        self.message = _redact(f"{uri}: {problem}")
        self.hint = _redact(hint) if hint else None
        text = self.message + (f"\n  hint: {self.hint}" if self.hint else "")
        super().__init__(text)


# ---------------------------------------------------------------------------- URIs


def _scheme(uri: str) -> str:
    match = _SCHEME_RE.match(uri)
    if match:
        return match.group(1).lower()
    # `s3:/bucket` (one slash) would otherwise become a local directory named `s3:`.
    bad = re.match(r"^([A-Za-z][A-Za-z0-9+.-]+):/", uri)
    if bad:
        raise StorageError(uri, "malformed URI", f"write it as `{bad.group(1)}://...`")
    return ""


def join(uri: str, *parts: str) -> str:
    """Append path parts to a URI or path with single slashes: `join("s3://b/p/", "/x")`
    is `s3://b/p/x`. Keeps the scheme and does not expand `~` or make paths absolute."""
    match = _SCHEME_RE.match(uri)
    head, rest = (match.group(0), uri[match.end() :]) if match else ("", uri)
    rooted = rest.startswith("/")
    pieces = [p for p in re.split(r"/+", rest) if p]
    for part in parts:
        pieces += [p for p in re.split(r"/+", str(part)) if p]
    return head + ("/" if rooted else "") + "/".join(pieces)


def _s3_bucket_key(uri: str) -> tuple[str, str]:
    rest = uri.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    key = "/".join(p for p in key.split("/") if p)
    if not bucket:
        raise StorageError(uri, "no bucket in the S3 URI", "write it as `s3://bucket/prefix`")
    return bucket, key


def _local_path(uri: str) -> str:
    if _scheme(uri) == "file":
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise StorageError(uri, f"file:// URI names a remote host {parts.netloc!r}",
                               "use `file:///absolute/path` or a plain path")
        path = unquote(parts.path)
    else:
        path = uri
    return os.path.abspath(os.path.expanduser(path))


def _endpoint_var() -> tuple[str, str] | None:
    """(variable name, value) of the S3 endpoint setting, if any."""
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        value = os.environ.get(var, "").strip()
        if value:
            return var, value
    return None


def _describe_endpoint() -> str:
    setting = _endpoint_var()
    if setting is None:
        return f"AWS S3 (region {_region()})"
    # Never echo userinfo someone may have put in the URL.
    return re.sub(r"//[^/@]*@", "//", setting[1])


def _region() -> str:
    return (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "").strip() \
        or DEFAULT_REGION


def _s3_options(uri: str, *, probe: bool = False) -> dict:
    """Keyword arguments for `pyarrow.fs.S3FileSystem` from the environment.

    The result holds the secret key when one is set: never log or cache it."""
    options: dict = {
        "region": _region(),
        "connect_timeout": _PROBE_CONNECT_TIMEOUT_S if probe else _IO_CONNECT_TIMEOUT_S,
        "request_timeout": _PROBE_REQUEST_TIMEOUT_S if probe else _IO_REQUEST_TIMEOUT_S,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(
            max_attempts=_PROBE_MAX_ATTEMPTS if probe else _IO_MAX_ATTEMPTS
        ),
    }
    setting = _endpoint_var()
    if setting is not None:
        var, endpoint = setting
        try:
            parts = urlsplit(endpoint)
            port = parts.port
        except ValueError:
            parts, port = None, None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise StorageError(
                uri,
                f"{var} must look like http(s)://host[:port], got {_describe_endpoint()!r}",
                f"e.g. {var}=http://127.0.0.1:8333 for a local SeaweedFS or MinIO; "
                "unset it for AWS S3",
            )
        if parts.path not in ("", "/"):
            raise StorageError(uri, f"{var} has a path ({parts.path!r})",
                               "give only scheme, host and port")
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        options["endpoint_override"] = host + (f":{port}" if port else "")
        options["scheme"] = parts.scheme
    key_id = os.environ.get("AWS_ACCESS_KEY_ID", "").strip()
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY", "").strip()
    if bool(key_id) != bool(secret):
        raise StorageError(
            uri,
            "only one of AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY is set",
            "set both, or neither to use a profile or instance role",
        )
    if key_id:
        options["access_key"] = key_id
        options["secret_key"] = secret
        token = os.environ.get("AWS_SESSION_TOKEN", "").strip()
        if token:
            options["session_token"] = token
    return options


def _filesystem(uri: str, *, probe: bool = False) -> tuple[pafs.FileSystem, str]:
    scheme = _scheme(uri)
    if scheme == "s3":
        bucket, key = _s3_bucket_key(uri)
        try:
            fs = pafs.S3FileSystem(**_s3_options(uri, probe=probe))
        except (OSError, pyarrow.ArrowException, ValueError, TypeError) as e:
            raise StorageError(uri, f"cannot configure S3: {e}") from None
        return fs, f"{bucket}/{key}" if key else bucket
    if scheme in ("", "file"):
        return pafs.LocalFileSystem(), _local_path(uri)
    raise StorageError(
        uri, f"unsupported storage scheme {scheme}://",
        "use s3://bucket/prefix (any S3-compatible store via AWS_ENDPOINT_URL) or a local path",
    )


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """`(pyarrow filesystem, path)` for a storage URI.

    `s3://bucket/prefix` -> `(S3FileSystem, "bucket/prefix")` configured from the AWS
    environment (see the module docstring); `file:///p`, `/p`, `~/p`, `p` ->
    `(LocalFileSystem, "/abs/p")`. Any other scheme raises StorageError."""
    from trainers import secrets_env

    secrets_env.load()  # a local job's credentials arrive by file (trainers.secrets_env)
    return _filesystem(uri)


# ---------------------------------------------------------------------------- errors


def _diagnose(uri: str, error: BaseException, action: str) -> StorageError:
    text = str(error)
    if _scheme(uri) != "s3":
        if isinstance(error, PermissionError):
            return StorageError(uri, f"{action}: permission denied ({text})",
                                "choose a directory this user can write to")
        return StorageError(uri, f"{action}: {text}",
                            "use a local directory this user can create and write, or s3://")
    bucket, _ = _s3_bucket_key(uri)
    endpoint = _describe_endpoint()
    upper = text.upper()
    if "NO_SUCH_BUCKET" in upper or "NOSUCHBUCKET" in upper or "BUCKET DOES NOT EXIST" in upper:
        return StorageError(
            uri, f"{action}: bucket {bucket!r} does not exist at {endpoint}",
            f"create it (e.g. `aws s3 mb s3://{bucket}`, adding --endpoint-url for a non-AWS "
            "store) or point the storage setting at an existing bucket",
        )
    if any(k in upper for k in ("ACCESS_DENIED", "ACCESSDENIED", "SIGNATURE_DOES_NOT_MATCH",
                                "INVALID_ACCESS_KEY", "INVALIDACCESSKEY", "FORBIDDEN",
                                "EXPIRED_TOKEN", "EXPIREDTOKEN", "INVALIDTOKEN")):
        return StorageError(
            uri, f"{action}: access denied by {endpoint} ({text})",
            "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the profile / instance role) "
            f"and that they may read, write and delete under s3://{bucket}",
        )
    if any(k in upper for k in ("NETWORK_CONNECTION", "CURLCODE", "COULD NOT CONNECT",
                                "COULD NOT RESOLVE", "TIMED OUT", "TIMEOUT")):
        return StorageError(
            uri, f"{action}: cannot reach the S3 endpoint {endpoint} ({text})",
            "start the server or fix AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 (http(s)://host:port; "
            "unset both for AWS), "
            "and check the network from this machine",
        )
    if "CREDENTIAL" in upper:
        return StorageError(
            uri, f"{action}: no usable S3 credentials for {endpoint} ({text})",
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role",
        )
    return StorageError(uri, f"{action} at {endpoint}: {text}")


@contextmanager
def _errors(uri: str, action: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except (OSError, pyarrow.ArrowException) as e:
        raise _diagnose(uri, e, action) from e


def _is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


# ---------------------------------------------------------------------------- operations


def write_text(uri: str, text: str) -> None:
    """Write `text` (UTF-8) to `uri`, replacing it. Local writes go through a temporary
    file and a rename, so readers never see half a file (S3 PUTs are atomic already)."""
    fs, path = filesystem(uri)
    data = text.encode("utf-8")
    with _errors(uri, "writing"):
        if _is_local(fs):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as out:
                    out.write(data)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            with fs.open_output_stream(path) as out:
                out.write(data)


def read_text(uri: str) -> str | None:
    """The UTF-8 text at `uri`, or None if there is no such file (or bucket)."""
    fs, path = filesystem(uri)
    with _errors(uri, "reading"):
        try:
            with fs.open_input_stream(path) as src:
                return src.read().decode("utf-8")
        except FileNotFoundError:
            return None


# On S3 a "directory" is a key prefix with objects under it. Delimited listings (pyarrow's
# non-recursive FileSelector and its directory test in get_file_info) are not trusted there:
# SeaweedFS derives common prefixes from its directory tree and keeps reporting a deleted
# prefix until its empty-folder cleaner runs (~2.5 min here). Flat listings are exact, so
# S3 directories are judged by the files found under them.


def _s3_files_under(fs: pafs.FileSystem, path: str) -> list[str]:
    """Paths of the files (not markers) under the S3 prefix `path`, relative to it."""
    base = path.rstrip("/") + "/"
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    return [i.path[len(base):] for i in infos
            if i.type == pafs.FileType.File and i.path.startswith(base)]


def exists(uri: str) -> bool:
    """Whether a file or a directory exists at `uri`. On S3 a directory exists when some
    file lies under it (S3 has no empty directories); locally an empty one counts."""
    fs, path = filesystem(uri)
    with _errors(uri, "checking"):
        kind = fs.get_file_info(path).type
        if kind != pafs.FileType.Directory or _is_local(fs):
            return kind != pafs.FileType.NotFound
        return bool(_s3_files_under(fs, path))


def list_dir(uri: str) -> list[str]:
    """Sorted base names of the direct children of `uri`; [] if it does not exist. On S3
    a child directory is listed when some file lies under it; this lists the whole subtree
    (one request per 1,000 objects), so point it at small prefixes."""
    fs, path = filesystem(uri)
    with _errors(uri, "listing"):
        if _is_local(fs):
            infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
            return sorted(info.base_name for info in infos)
        return sorted({rel.split("/", 1)[0] for rel in _s3_files_under(fs, path)})


def delete(uri: str) -> None:
    """Delete the file or directory tree at `uri`; nothing happens if it does not exist.
    `s3://bucket` (no prefix) empties the bucket but keeps it."""
    fs, path = filesystem(uri)
    with _errors(uri, "deleting"):
        kind = fs.get_file_info(path).type
        try:
            if kind == pafs.FileType.File:
                fs.delete_file(path)
            elif kind == pafs.FileType.Directory:
                if not _is_local(fs) and "/" not in path:
                    fs.delete_dir_contents(path, missing_dir_ok=True)
                else:
                    fs.delete_dir(path)
        except FileNotFoundError:
            pass  # deleted meanwhile, or a SeaweedFS prefix that only looks alive


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy the local directory tree `local_dir` into `uri` (files present at `uri` and
    not in `local_dir` are kept)."""
    src = os.path.abspath(os.path.expanduser(local_dir))
    if not os.path.isdir(src):
        raise StorageError(src, "not a directory", "upload_dir copies a local directory tree")
    fs, path = filesystem(uri)
    with _errors(uri, "uploading"):
        if _is_local(fs):
            fs.create_dir(path, recursive=True)
        pafs.copy_files(src, path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)


def download_dir(uri: str, local_dir: str, skip_suffixes: tuple[str, ...] = ()) -> None:
    """Copy the directory tree at `uri` into the local directory `local_dir` (created if
    needed; files already there and not at `uri` are kept). Files whose names end with one
    of `skip_suffixes` are left out (e.g. weights, when only a tokenizer is needed)."""
    fs, path = filesystem(uri)
    dest = os.path.abspath(os.path.expanduser(local_dir))
    with _errors(uri, "downloading"):
        kind = fs.get_file_info(path).type
        if kind != pafs.FileType.Directory or not (_is_local(fs) or _s3_files_under(fs, path)):
            raise StorageError(uri, "no directory there to download")
        os.makedirs(dest, exist_ok=True)
        if not skip_suffixes:
            pafs.copy_files(path, dest, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            return
        local = pafs.LocalFileSystem()
        for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
            if info.type != pafs.FileType.File or info.path.endswith(skip_suffixes):
                continue
            target = os.path.join(dest, info.path[len(path):].lstrip("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            pafs.copy_files(info.path, target, source_filesystem=fs, destination_filesystem=local)


def check_writable(uri: str) -> None:
    """Write, read back and delete a small probe object under `uri`.

    Raises StorageError saying why not (bucket missing, access denied, endpoint
    unreachable: naming the endpoint, never the secret) within seconds, since the S3
    client here uses short connect timeouts and few retries. On S3 an empty marker for
    `uri` may remain (pyarrow keeps the parent "directory" alive after a delete)."""
    fs, path = _filesystem(uri, probe=True)
    probe = f"{path}/.write-probe-{uuid.uuid4().hex}"
    payload = f"probe {uuid.uuid4().hex}".encode()
    with _errors(uri, "write probe"):
        if _is_local(fs):
            fs.create_dir(path, recursive=True)
        with fs.open_output_stream(probe) as out:
            out.write(payload)
        try:
            with fs.open_input_stream(probe) as src:
                back = src.read()
        finally:
            fs.delete_file(probe)
    if back != payload:
        raise StorageError(uri, "the probe object read back differs from what was written",
                           f"the store at {_describe_endpoint()} is not consistent")
