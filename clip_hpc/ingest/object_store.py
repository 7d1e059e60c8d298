"""Inputs by URL (`s3://bucket/key`, or any protocol whose fsspec package is installed): listing, ranged reads, and
the object identity the server checks, in one place.

fsspec (and s3fs, botocore) are imported only when a URL is used, so local runs and the laptop side never load them.
Credentials and the endpoint come from the standard AWS sources (environment incl. `AWS_ENDPOINT_URL`, `~/.aws`,
profiles). Every read is a ranged GET of exactly the bytes wanted, retried with backoff when the error may pass
(throttling, a dropped connection); a missing or forbidden object fails at once.
"""

from __future__ import annotations

import io
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

from clip_hpc.errors import UserError

T = TypeVar("T")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
RETRIES = 4  # attempts per read, for protocols whose client does not retry by itself
# These clients retry throttling and transient errors with backoff themselves (s3fs over botocore, honouring
# AWS_MAX_ATTEMPTS / AWS_RETRY_MODE): retrying on top would multiply the wait on an object that stays broken.
SELF_RETRYING = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "az"})
BACKOFF_S = 0.2
LISTING_BLOCK = 16 << 10  # bytes fetched per ranged read while walking tar headers: a header plus small sidecars
# A stalled store is no reason to wait longer: a call that ran out of its deadline is not tried again.
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, TimeoutError)


@dataclass(frozen=True)
class TimeBounds:
    """How long one call to an object store may take: to connect, between bytes read (botocore's, per attempt),
    and in all, its retries included (ours: the call is cancelled and fails with TimeoutError)."""

    connect_s: float = 5.0
    read_s: float = 15.0
    call_s: float = 60.0

    @staticmethod
    def from_env() -> TimeBounds:
        """`CLIP_HPC_STORE_CONNECT_TIMEOUT`, `CLIP_HPC_STORE_READ_TIMEOUT`, `CLIP_HPC_STORE_CALL_TIMEOUT` (seconds)."""
        default = TimeBounds()
        names = ("CONNECT", "READ", "CALL")
        values = [
            _seconds(f"CLIP_HPC_STORE_{n}_TIMEOUT", d)
            for n, d in zip(names, (default.connect_s, default.read_s, default.call_s))
        ]
        return TimeBounds(*values)


def _seconds(name: str, default: float) -> float:
    text = os.environ.get(name, "")
    try:
        value = float(text) if text else default
    except ValueError:
        raise UserError(f"{name}={text!r}: not a number of seconds") from None
    if not 0 < value < 1e6:
        raise UserError(f"{name}={text!r}: must be a positive number of seconds")
    return value


def is_url(path: str | os.PathLike) -> bool:
    """`scheme://...`: an object-store input, never `os.path`'d (abspath would turn `s3://b` into `$PWD/s3:/b`)."""
    return isinstance(path, str) and _URL.match(path) is not None


def normal_url(url: str) -> str:
    """The scheme in lower case (`S3://b/k` -> `s3://b/k`): clients only strip their own spelling of it."""
    scheme, sep, rest = url.partition("://")
    return scheme.lower() + sep + rest


def require_posix(path: str | os.PathLike, flag: str = "--out") -> None:
    """Outputs stay on a POSIX file system: HDF5 shards, SQLite and FAISS need seekable, renameable local files."""
    if is_url(path):
        raise UserError(
            f"{flag} {path}: outputs must be a directory on a POSIX file system (HDF5 and FAISS need "
            "one); only inputs may be object-store URLs"
        )


_filesystems: dict[tuple[str, int], Any] = {}


def filesystem(url: str) -> Any:
    """The fsspec file system for `url`'s protocol, one per process (an s3fs client is not fork-safe, so a DataLoader
    worker makes its own); a protocol whose package is missing is a one-line error."""
    protocol = url.split("://", 1)[0].lower()
    key = (protocol, os.getpid())
    if key not in _filesystems:
        bounds = TimeBounds.from_env()
        options: dict[str, Any] = {}
        if protocol in ("s3", "s3a"):  # botocore's own bounds, per attempt
            options["config_kwargs"] = {"connect_timeout": bounds.connect_s, "read_timeout": bounds.read_s}
        try:
            import fsspec

            # our own cache (per process): fsspec's would hand back a client made for another endpoint or bounds
            _filesystems[key] = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
        except ImportError as exc:
            hint = " (pip install 'clip-hpc[s3]')" if protocol in ("s3", "s3a") else ""
            raise UserError(f"cannot read {url}: the {protocol}:// protocol needs a package{hint}: {exc}") from None
        except ValueError as exc:
            raise UserError(f"cannot read {url}: {exc}") from None
    return _filesystems[key]


def _attempts(url: str) -> int:
    return 1 if url.split("://", 1)[0].lower() in SELF_RETRYING else RETRIES


def with_retries(what: Callable[[], T], attempts: int = RETRIES) -> T:
    """`what()`, again after a growing, jittered pause while it fails with an error that may pass."""
    for attempt in range(attempts):
        try:
            return what()
        except PERMANENT:
            raise
        except OSError:
            if attempt == attempts - 1:
                raise
        time.sleep(BACKOFF_S * 2**attempt * (0.5 + random.random()))
    raise AssertionError("unreachable")


NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "NoAuthTokenError", "UnauthorizedSSOTokenError")
UNREACHABLE = ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ProxyConnectionError")
BAD_CREDENTIALS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "AccessDenied")


def as_oserror(exc: BaseException, url: str) -> OSError:
    """Pure: one kind for every failure of a client (botocore's own types are no OSError; ValueError for a bad
    range), with a message a user can act on: a deadline passed, no or bad credentials, an endpoint not reached."""
    name = type(exc).__name__
    if isinstance(exc, TimeoutError) or name == "ReadTimeoutError":
        return TimeoutError(f"{url}: the object store did not answer within {TimeBounds.from_env().call_s:g} s")
    if name in NO_CREDENTIALS:
        return PermissionError(
            f"{url}: no credentials for the object store (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            f"AWS_PROFILE, or ~/.aws/credentials): {exc}"
        )
    if name in UNREACHABLE:
        return ConnectionError(f"{url}: cannot reach the object store: {exc}")
    if isinstance(exc, PermissionError) or any(code in str(exc) for code in BAD_CREDENTIALS):
        return PermissionError(f"{url}: access denied (bad credentials, or no permission to read it): {exc}")
    return exc if isinstance(exc, OSError) else OSError(f"{url}: {name}: {exc}")


def _call(url: str, method: str, *args: Any, **kwargs: Any) -> Any:
    """`filesystem(url).method(*args, **kwargs)` within `TimeBounds.call_s` in all (an async client's call is
    cancelled then), its failures as `as_oserror` says. A missing package is a UserError, not a read error."""
    fs = filesystem(url)
    from fsspec.asyn import AsyncFileSystem

    if isinstance(fs, AsyncFileSystem):
        kwargs["timeout"] = TimeBounds.from_env().call_s  # fsspec's sync(): wait_for, then FSTimeoutError
    try:
        return getattr(fs, method)(*args, **kwargs)
    except Exception as exc:
        raise as_oserror(exc, url) from exc


def read_range(url: str, start: int | None, stop: int | None) -> bytes:
    """Bytes [start, stop) of an object (to its end for None): one ranged GET, retried. Short at the object's end."""
    return with_retries(lambda: _call(url, "cat_file", url, start=start, end=stop), _attempts(url))


def read_object(url: str) -> bytes:
    """A whole (loose image) object: one GET, retried."""
    return read_range(url, 0, None)  # "bytes=0-": one GET, where no range would cost s3fs a HEAD first


@dataclass(frozen=True)
class ObjectStat:
    """What the server and the tar listing need of an object: whether it is one, its size, and its identity."""

    is_file: bool
    size: int
    identity: tuple

    @staticmethod
    def of(info: dict[str, Any]) -> ObjectStat:
        """The identity is the ETag when the store gives one, else the size and last-modified time: a rewritten
        object gets a new one, so a cache keyed by it never serves stale bytes."""
        size = int(info.get("size") or info.get("Size") or 0)
        etag = info.get("ETag") or info.get("etag")
        modified = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
        identity = ("etag", str(etag)) if etag else ("size-mtime", size, str(modified))
        return ObjectStat(info.get("type") == "file", size, identity)


def stat_object(url: str, *, fresh: bool = True) -> ObjectStat:
    """The object's current state (FileNotFoundError when it is gone), retried; `fresh` bypasses listing caches."""

    def head() -> ObjectStat:
        try:
            info = _call(url, "info", url, refresh=True) if fresh else _call(url, "info", url)
        except OSError as exc:
            if not isinstance(exc.__cause__, TypeError):
                raise
            info = _call(url, "info", url)  # a protocol whose info() takes no refresh
        return ObjectStat.of(info)

    return with_retries(head, _attempts(url))


@lru_cache(maxsize=4096)
def is_object(url: str) -> bool:
    """Whether `url` names an object (not a prefix, not missing); cached: the server asks it to split member lines.
    A store that cannot be asked (no answer, no credentials, access denied) is an OSError saying so, never "no"."""
    try:
        return stat_object(url, fresh=False).is_file
    except FileNotFoundError:
        return False


def is_prefix(url: str) -> bool:
    """A "directory": a prefix that holds objects (OSError as for `is_object`)."""
    try:
        return with_retries(lambda: bool(_call(url, "isdir", url)), _attempts(url))
    except FileNotFoundError:
        return False


def list_prefix(url: str, keep: Callable[[str], bool]) -> list[str]:
    """Every object under the prefix `url` whose name `keep`s, as URLs, sorted: the store's listing is paginated
    (s3fs's `find` follows continuation tokens), so 100k objects cost 100 list requests, no object is read."""
    try:
        found = with_retries(lambda: _call(url, "find", url.rstrip("/") + "/"), _attempts(url))
    except OSError as exc:
        raise UserError(f"cannot list {url}: {exc}") from None
    fs = filesystem(url)
    return sorted(u for u in (fs.unstrip_protocol(p) for p in found) if keep(u))


class RangedReader(io.RawIOBase):
    """A seekable read-only file over an object, fetching `block` bytes per ranged GET (0: exactly what each read
    asks for), so `tarfile` can walk a tar's headers, and `tars.read_member` read a member, without downloading it."""

    def __init__(self, url: str, size: int | None = None, block: int = LISTING_BLOCK) -> None:
        super().__init__()
        self.url, self.size, self.block = url, size, block
        self.pos = 0
        self._buffer, self._buffer_at = b"", 0
        self.name = url

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size or 0}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def prefetch(self, start: int, stop: int) -> None:
        """Fetch [start, stop) with one ranged GET, unless held already, for the reads that follow (a batch's
        members, a sample's image, caption and json)."""
        if not (self._buffer_at <= start and stop <= self._buffer_at + len(self._buffer)):
            self._buffer, self._buffer_at = read_range(self.url, start, stop), start

    def readinto(self, out: Any) -> int:
        want = len(out)
        if self.size is not None:
            want = min(want, self.size - self.pos)
        if want <= 0:
            return 0
        lo = self.pos - self._buffer_at
        if not (0 <= lo and lo + want <= len(self._buffer)):
            stop = self.pos + max(want, self.block)
            self._buffer = read_range(self.url, self.pos, stop if self.size is None else min(stop, self.size))
            self._buffer_at, lo = self.pos, 0
        got = self._buffer[lo : lo + want]
        out[: len(got)] = got
        self.pos += len(got)
        return len(got)


def open_ranged(url: str, block: int = LISTING_BLOCK) -> tuple[RangedReader, int]:
    """A `RangedReader` over the object and its size (one HEAD)."""
    stat = stat_object(url, fresh=False)
    if not stat.is_file:
        raise FileNotFoundError(f"{url} is not an object")
    return RangedReader(url, stat.size, block), stat.size
