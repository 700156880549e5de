"""A small object server on the loopback interface for the remote-shard tests and bench: serves a folder over
HTTP/1.1 with ranged GETs (RFC 9110 single ranges), and misbehaves on request.

    with ObjectServer(folder, drop_every=3) as server:      # every 3rd request: the connection drops
        url = server.url("shards/sft")                    # http://127.0.0.1:PORT/shards/sft
        ...
        server.requests                                   # Counter of the paths asked for

Faults (any combination): `drop_every=k` drops the connection on every k-th request, alternately before any
answer and halfway through the body; `fail_first=n` answers the first n requests with 503 (Retry-After 0);
`fail_for_s=t` answers 503 for t seconds from the `fail_from`-th request (default the first); `fail_status` replaces 503 in these two; `stall_first=n` waits `stall_s` before
answering the first n requests (past a client's timeout); `fail_paths` answers 503 to every request for those
paths (a shard that never comes back); `ignore_range` answers 200 with the whole file. The folder's first path
component doubles as an S3 bucket: with `AWS_ENDPOINT_URL` set to `server.endpoint`, boto3 reads
`s3://BUCKET/KEY` from `folder/BUCKET/KEY` (path-style addressing; signatures are not checked).

Only addresses on 127.0.0.1 are served, and the server stops with the `with` block (or `stop()`).

    python -m tests.object_server FOLDER      # serve FOLDER: prints the endpoint, stops when stdin closes,
                                              # then prints {path: requests} as JSON (tests/bench/remote_bench.py)
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class ObjectServer:
    """A ThreadingHTTPServer serving `root` with ranged GETs and the faults of the module doc."""

    def __init__(self, root: str | Path, drop_every: int = 0, fail_first: int = 0, fail_for_s: float = 0.0,
                 fail_from: int = 1, fail_status: int = 503, stall_first: int = 0, stall_s: float = 0.0, fail_paths: tuple[str, ...] = (),
                 ignore_range: bool = False):
        self.root = Path(root).resolve()
        self.drop_every, self.fail_first, self.fail_for_s, self.fail_from = drop_every, fail_first, fail_for_s, fail_from
        self.stall_first, self.stall_s, self.fail_paths = stall_first, stall_s, tuple(fail_paths)
        self.ignore_range, self.fail_status = ignore_range, fail_status
        self.requests: Counter = Counter()  # path -> GETs asked for, faults included
        self.faults: Counter = Counter()  # kind -> faults served
        self.faulted: Counter = Counter()  # path -> faults served
        self._count, self._window_from, self._lock = 0, None, threading.Lock()
        self._httpd = _QuietServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="object-server", daemon=True)

    @property
    def endpoint(self) -> str:
        """http://127.0.0.1:PORT, where the server listens."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, relative: str = "") -> str:
        """The http URL of `root/relative`."""
        return f"{self.endpoint}/{relative.strip('/')}"

    def start(self) -> ObjectServer:
        """Start serving in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> ObjectServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def fault(self, path: str) -> str | None:
        """The fault to serve for this request (None: answer properly); counts the request."""
        with self._lock:
            self._count += 1
            self.requests[path] += 1
            now = time.monotonic()
            if self._window_from is None and self._count >= self.fail_from:
                self._window_from = now
            in_window = self._window_from is not None and now - self._window_from < self.fail_for_s
            kind = None
            if path in self.fail_paths:
                kind = "503"
            elif self._count <= self.fail_first or in_window:
                kind = str(self.fail_status)
            elif self.drop_every and self._count % self.drop_every == 0:
                kind = "drop_mid_body" if (self._count // self.drop_every) % 2 == 0 else "drop"
            elif self._count <= self.stall_first:
                kind = "stall"
            if kind:
                self.faults[kind] += 1
                self.faulted[path] += 1
            return kind

    def file(self, path: str) -> Path | None:
        """The file under root that a URL path names (None outside root or missing)."""
        candidate = (self.root / unquote(path).lstrip("/")).resolve()
        if self.root not in candidate.parents or not candidate.is_file():
            return None
        return candidate


class _QuietServer(ThreadingHTTPServer):
    """A client that gave up (timed out, closed) mid-answer is expected here, not an error to print."""

    daemon_threads = True

    def handle_error(self, request, client_address):
        pass


def _handler(server: ObjectServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as object stores do
        # Headers and body go out in two writes: with Nagle's algorithm the body would wait for the client's
        # delayed ACK of the headers (40 ms on Linux) on every request.
        disable_nagle_algorithm = True

        def log_message(self, format, *args):  # noqa: A002 - the base class's name
            pass

        def do_GET(self):  # noqa: N802 - the base class's name
            path = urlsplit(self.path).path
            fault = server.fault(path)
            if fault == "drop":
                self.close_connection = True  # nothing sent: the client sees the connection close
                return
            if fault == "503":
                return self._send(503, b"<Error><Code>SlowDown</Code></Error>", {"Retry-After": "0"})
            if fault is not None and fault.isdigit():
                return self._send(int(fault), b"<Error><Code>AccessDenied</Code></Error>")
            if fault == "stall":
                time.sleep(server.stall_s)
            target = server.file(path)
            if target is None:
                return self._send(404, b"<Error><Code>NoSuchKey</Code></Error>")
            total = target.stat().st_size
            start, end, status, headers = 0, total - 1, 200, {}
            match = _RANGE.fullmatch(self.headers.get("Range", "").strip())
            if match and match[0] != "bytes=-" and not server.ignore_range:
                first, last = match[1], match[2]
                start, end = (int(first), int(last or total - 1)) if first else (max(total - int(last), 0), total - 1)
                if start >= total or start > end:
                    return self._send(416, b"", {"Content-Range": f"bytes */{total}"})
                end, status = min(end, total - 1), 206
                headers["Content-Range"] = f"bytes {start}-{end}/{total}"
            with open(target, "rb") as f:
                f.seek(start)
                data = f.read(end + 1 - start)
            if fault == "drop_mid_body":
                self.close_connection = True
                self.send_response(status)
                for key, value in {"Content-Length": str(len(data)), **headers}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                return
            self._send(status, data, headers)

        def _send(self, status: int, body: bytes, headers: dict | None = None):
            self.send_response(status)
            for key, value in {"Content-Length": str(len(body)), "Accept-Ranges": "bytes", **(headers or {})}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

    return Handler


def main(argv: list[str] | None = None) -> int:
    """Serve a folder on 127.0.0.1 (no faults) until standard input closes; print the endpoint, then the counts."""
    (folder,) = sys.argv[1:] if argv is None else argv
    with ObjectServer(folder) as server:
        print(server.endpoint, flush=True)
        sys.stdin.read()
    print(json.dumps(dict(server.requests)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
