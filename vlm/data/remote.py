"""Reading shard folders from object storage: whole small objects and byte ranges, with timeouts and retries.

    from vlm.data.remote import RemoteSettings, RemoteStore, is_remote
    store = RemoteStore(RemoteSettings(timeout_s=30, retries=6, backoff_s=0.5))
    manifest = store.get("https://host/shards/sft/manifest.json")            # a whole (small) object
    group = store.get_range("s3://bucket/shards/sft/sft-000003.tar", 7680, 41984)   # one sample's bytes

`http://` and `https://` URLs are read with the standard library (`http.client`, one kept-alive connection per
host and process). For `s3://bucket/key`, boto3 (an optional dependency: `pip install
'minimind-vlm-trainer[s3]'`) signs a presigned GET URL (SigV4) once per object and process, and the same
`http.client` path reads ranges of it: botocore's own request machinery costs ~0.8 ms of CPU per request,
against ~0.15 ms here, and a worker makes one request per sample. Endpoint, region and credentials come from
the standard AWS variables and files (`AWS_ENDPOINT_URL` or `AWS_ENDPOINT_URL_S3` for an S3-compatible server,
which is then addressed by path; `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`,
`AWS_PROFILE`). Presigned URLs carry a signature, so messages and logs name the s3:// URL instead.

Failures. A refused connection, a dropped one, a timeout, a short body and HTTP 408/425/429/5xx are tried
again, `retries` times, after waits that double from `backoff_s` (at most `MAX_BACKOFF_S`, or a longer
Retry-After), each scaled by a random factor in [0.5, 1] so that workers do not retry in step. Anything else
(404, 403, a redirect, a server that ignores Range) fails at once; a 403 on a presigned URL is signed anew once. Either way `RemoteError` names the URL; the reader
turns it into a counted skip. A ranged answer must be HTTP 206 with the Content-Range asked for and exactly
`size` bytes; the tar bytes themselves are checked by the reader (a shard's sha256 in the manifest covers the
whole file, so it cannot be checked on a range).

Connections and the boto3 client belong to the process that made them: a forked DataLoader worker opens its
own (the store notices the new process id), and pickling drops them.
"""

from __future__ import annotations

import http.client
import importlib.util
import logging
import os
import random
import re
import ssl
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

REMOTE_SCHEMES = ("http://", "https://", "s3://")
MAX_BACKOFF_S = 30.0
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
PRESIGN_EXPIRES_S, PRESIGN_RENEW_S = 3600, 900  # presigned s3 URLs: valid an hour, signed anew every 15 min
MAX_SIGNED = 4096  # presigned URLs kept per process (one per shard read)
BOTO3_HINT = "s3:// sources need boto3: pip install 'minimind-vlm-trainer[s3]' (or boto3==1.44.5)"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class RemoteError(Exception):
    """A remote object that could not be read, after the last retry or at once; the message names the URL.
    `status` is the HTTP status of a refusal (404, 403, ...), None for other failures."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class _Transient(Exception):
    """A failure worth another try (connection, timeout, short body, 408/429/5xx); `wait` is a Retry-After."""

    def __init__(self, message: str, wait: float = 0.0):
        super().__init__(message)
        self.wait = wait


def is_remote(spec: str) -> bool:
    """True for an http(s):// or s3:// location."""
    return str(spec).startswith(REMOTE_SCHEMES)


def require_s3_client() -> None:
    """Raise RemoteError naming the package to install when boto3 (for s3:// URLs) is missing."""
    if importlib.util.find_spec("boto3") is None:
        raise RemoteError(BOTO3_HINT)


def join_url(base: str, name: str) -> str:
    """`base/name` for a plain file name (letters, digits, `_.-`: nothing to quote; the caller checked it)."""
    return f"{base.rstrip('/')}/{name}"


@dataclass(frozen=True)
class RemoteSettings:
    """Seconds a request may wait to connect or for more bytes, retries after the first try, and the first wait
    between tries (seconds; it doubles with each try)."""

    timeout_s: float = 30.0
    retries: int = 6
    backoff_s: float = 0.5

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    def problems(self) -> list[str]:
        """Every value out of range, named by its config field."""
        return [message for ok, message in (
            (self.timeout_s > 0, f"data.remote_timeout_s must be > 0, got {self.timeout_s}"),
            (isinstance(self.retries, int) and self.retries >= 0, f"data.remote_retries must be >= 0, got {self.retries}"),
            (self.backoff_s >= 0, f"data.remote_backoff_s must be >= 0, got {self.backoff_s}"),
        ) if not ok]

    @classmethod
    def from_config(cls, data: Any) -> RemoteSettings:
        """The settings of a `vlm.config.DataConfig` (data.remote_*); ValueError names a bad field."""
        return cls(data.remote_timeout_s, data.remote_retries, data.remote_backoff_s)


class RemoteStore:
    """GETs of whole objects and byte ranges over http(s) and s3, retried; picklable (connections are not sent).

    `stats` counts this process's requests, retries and bytes received.
    """

    def __init__(self, settings: RemoteSettings | None = None):
        self.settings = settings or RemoteSettings()
        self._pid = os.getpid()
        self._connections: dict[tuple[str, str], http.client.HTTPConnection] = {}
        self._s3: Any = None
        self._signed: OrderedDict[str, tuple[str, float]] = OrderedDict()  # s3:// URL -> (presigned, when)
        self._random = random.Random()
        self.stats: Counter = Counter()

    def __getstate__(self) -> dict:
        return {"settings": self.settings}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["settings"])

    def get(self, url: str) -> bytes:
        """The whole object at `url` (a manifest or an index). Raises RemoteError."""
        return self._retrying(url, "GET", lambda: self._fetch(url, None, None))

    def get_range(self, url: str, offset: int, size: int) -> bytes:
        """Exactly `size` bytes of the object at `url` from byte `offset`, in one ranged GET. Raises RemoteError."""
        if size < 1 or offset < 0:
            raise RemoteError(f"{url}: invalid range of {size} bytes at offset {offset}")
        return self._retrying(url, f"GET bytes {offset}-{offset + size - 1}", lambda: self._fetch(url, offset, size))

    def close(self) -> None:
        """Close this process's connections; the next request opens them again."""
        for conn in self._connections.values():
            conn.close()
        self._connections.clear()

    def _retrying(self, url: str, what: str, fetch: Callable[[], bytes]) -> bytes:
        if os.getpid() != self._pid:  # a forked worker: the parent's sockets, client and jitter are not its own
            self._pid, self._connections, self._s3, self._random = os.getpid(), {}, None, random.Random()
            self._signed = OrderedDict()
        attempts = self.settings.retries + 1
        for attempt in range(attempts):
            try:
                data = fetch()
                self.stats.update(requests=1, bytes=len(data))
                return data
            except _Transient as err:
                self.stats.update(requests=1, retries=int(attempt + 1 < attempts))
                if attempt + 1 == attempts:
                    raise RemoteError(f"{url}: {what} failed {attempts} times, last: {err}") from None
                wait = max(err.wait, self.settings.backoff_s * 2 ** attempt * self._random.uniform(0.5, 1.0))
                wait = min(wait, MAX_BACKOFF_S)
                if self.stats["retries"] <= 5 or self.stats["retries"] % 100 == 0:
                    log.warning("%s: %s failed (%s); try %d of %d in %.2f s (%d retries in this process)", url,
                                what, err, attempt + 2, attempts, wait, self.stats["retries"])
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _fetch(self, url: str, offset: int | None, size: int | None) -> bytes:
        if url.startswith("s3://"):
            return self._fetch_s3(url, offset, size)
        if url.startswith(("http://", "https://")):
            return self._fetch_http(url, url, offset, size)
        raise RemoteError(f"{url}: not an http(s):// or s3:// URL")

    def _connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        conn = self._connections.get((scheme, netloc))
        if conn is None:
            timeout = self.settings.timeout_s
            conn = (http.client.HTTPSConnection(netloc, timeout=timeout, context=ssl.create_default_context())
                    if scheme == "https" else http.client.HTTPConnection(netloc, timeout=timeout))
            self._connections[(scheme, netloc)] = conn
        return conn

    def _fetch_http(self, url: str, name: str, offset: int | None, size: int | None) -> bytes:
        """GET `url` (whole, or `size` bytes from `offset`); messages name it `name`."""
        parts = urlsplit(url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {} if size is None else {"Range": f"bytes={offset}-{offset + size - 1}"}
        conn = self._connection(parts.scheme, parts.netloc)
        # A kept-alive connection the server has since closed fails before any answer: one fresh try at once.
        fresh = conn.sock is None
        while True:
            try:
                conn.request("GET", path, headers=headers)
                response = conn.getresponse()
                return self._http_body(name, response, offset, size)
            except _Transient:
                raise
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as err:
                conn.close()
                if fresh:
                    raise _Transient(f"{type(err).__name__}: {err}") from None
                fresh = True
            except (OSError, http.client.HTTPException) as err:  # refused, timed out, short body
                conn.close()
                raise _Transient(f"{type(err).__name__}: {err}") from None
            except BaseException:
                conn.close()  # a half-read response would poison the next request on this connection
                raise

    def _http_body(self, url: str, response: http.client.HTTPResponse, offset: int | None,
                   size: int | None) -> bytes:
        status = response.status
        whole = status == 200 and (size is None or (offset == 0 and response.length == size))
        if status == 206 and size is not None:
            _check_content_range(url, response.getheader("Content-Range"), offset, size)
        elif not whole:
            body = response.read(65536) if status != 200 else b""
            if status in RETRY_STATUS:
                response.read()  # the rest, so that the connection can be used again
                raise _Transient(f"HTTP {status} {response.reason}", _retry_after(response.getheader("Retry-After")))
            response.close()
            if status == 200:
                raise RemoteError(f"{url}: the server ignored the Range header (HTTP 200 with the whole object); "
                                  "serve the shards from a server that answers ranged GETs (HTTP 206)")
            detail = " ".join(body[:200].decode("utf-8", "replace").split())  # one line, whatever was sent
            raise RemoteError(f"{url}: HTTP {status} {response.reason}" + (f" ({detail})" if detail else ""), status)
        data = response.read()
        if size is not None and len(data) != size:
            raise _Transient(f"{len(data)} bytes received, {size} asked for")
        return data

    def _fetch_s3(self, url: str, offset: int | None, size: int | None) -> bytes:
        # A presigned URL that stopped working (credentials rotated, clock moved) is signed again once.
        for renew in (False, True):
            try:
                return self._fetch_http(self._presigned(url, renew), url, offset, size)
            except RemoteError as err:
                if err.status != 403 or renew:
                    raise
        raise AssertionError("unreachable")

    def _presigned(self, url: str, renew: bool) -> str:
        """A presigned GET URL for `s3://bucket/key`: boto3 signs it (credentials, region, endpoint), valid for
        PRESIGN_EXPIRES_S and signed again after PRESIGN_RENEW_S. Never shown: it carries a signature."""
        bucket, _, key = url.removeprefix("s3://").partition("/")
        if not bucket or not key:
            raise RemoteError(f"{url}: an s3:// URL is s3://BUCKET/KEY")
        signed, made = self._signed.get(url, ("", -PRESIGN_RENEW_S))
        if renew or time.monotonic() - made >= PRESIGN_RENEW_S:
            from botocore.exceptions import BotoCoreError

            try:
                signed = self._client().generate_presigned_url(
                    "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=PRESIGN_EXPIRES_S)
            except BotoCoreError as err:  # no credentials, an unknown region or profile
                raise RemoteError(f"{url}: {err} (boto3 reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                                  "AWS_PROFILE, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL)") from None
            self._signed[url] = (signed, time.monotonic())
            self._signed.move_to_end(url)
            while len(self._signed) > MAX_SIGNED:
                self._signed.popitem(last=False)
        return signed

    def _client(self) -> Any:
        if self._s3 is None:
            require_s3_client()
            import boto3
            from botocore.config import Config

            # An S3-compatible server named by AWS_ENDPOINT_URL(_S3) (MinIO, Ceph, moto) is addressed by path
            # (endpoint/bucket/key), which they all serve; AWS itself gets boto3's default.
            custom = bool(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
            config = Config(signature_version="s3v4", s3={"addressing_style": "path"} if custom else None)
            self._s3 = boto3.session.Session().client("s3", config=config)
        return self._s3


def _check_content_range(url: str, header: str | None, offset: int, size: int) -> None:
    """A 206 must cover exactly the bytes asked for; another range (or none) is the server's error."""
    match = _CONTENT_RANGE.fullmatch((header or "").strip())
    if match is None or (int(match[1]), int(match[2])) != (offset, offset + size - 1):
        raise RemoteError(f"{url}: asked for bytes {offset}-{offset + size - 1}, the answer covers {header!r} "
                          "(is the object shorter than its index says?)")


def _retry_after(header: str | None) -> float:
    """Seconds of a Retry-After header (the delta-seconds form; a date or garbage counts as none)."""
    try:
        return max(0.0, float(header)) if header else 0.0
    except ValueError:
        return 0.0
