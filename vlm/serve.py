"""Chat with a trained VLM in a browser: a local page to upload pictures, ask, and read the answer as it streams.

    python -m vlm.serve --checkpoint out/demo/sft/export                # http://127.0.0.1:8000/
    python -m vlm.serve --checkpoint out/demo/sft/export --port 0       # any free port; the URL is printed
    python -m vlm.serve --checkpoint out/sft_vlm_512.pth --config launch/configs/sft.yaml --max_new_tokens 128

The terminal chat's `Conversation` behind a page (`vlm/assets/chat_page/`) and a small JSON API, with the
standard library only. Each browser tab holds its own session; pictures belong to a session's first question
(as in `vlm.chat`), Reset clears its turns and pictures. One answer is generated at a time: other requests
wait. A client that goes away stops its generation. Uploads are checked on arrival with the model's own
preprocessing and `--max_pixels`; a refused picture is an error on the page. Binds 127.0.0.1 unless `--host`.

    GET  /api/info                          -> {"source", "max_upload_bytes", "max_pictures", "extensions"}
    POST /api/session                       -> {"session"}
    POST /api/picture?session=ID  (bytes)   -> {"pictures"}
    POST /api/ask    {"session", "prompt"}  -> NDJSON lines {"text"} ..., then {"done", "reply"} or {"error"}
    POST /api/reset  {"session"}            -> {"pictures": 0}
Errors before an answer starts are JSON {"error"} with a 4xx status (5xx for a failure of the model).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import secrets
import sys
import threading
import traceback
from collections import OrderedDict
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlsplit

from vlm.chat import Conversation
from vlm.formats.constants import IMAGE_EXTENSIONS
from vlm.formats.errors import BadSample
from vlm.inference import (
    GenerationSettings,
    LoadedVLM,
    add_generation_flags,
    add_model_flags,
    load_from_args,
    settings_from_args,
)

PAGE_FILES = {"/": ("index.html", "text/html"), "/chat.js": ("chat.js", "text/javascript"),
              "/chat.css": ("chat.css", "text/css")}
MAX_JSON_BYTES = 64 * 1024  # a prompt, not a document
CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


class PageError(Exception):
    """A request the server refuses; `status` is the HTTP status, the message is shown on the page."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


class ChatSessions:
    """The sessions of one loaded model, keyed by random ids; the least recently used go past `max_sessions`."""

    def __init__(self, vlm: LoadedVLM, settings: GenerationSettings, max_pictures: int = 8,
                 max_sessions: int = 64):
        self.vlm, self.settings = vlm, settings
        self.max_pictures, self.max_sessions = max_pictures, max_sessions
        self.conversations: OrderedDict[str, Conversation] = OrderedDict()
        self.table_lock = threading.Lock()  # guards `conversations`
        self.generation_lock = threading.Lock()  # one forward pass at a time; guards every Conversation too

    def new(self) -> str:
        """Open a session with no turns and no pictures; returns its id."""
        session = secrets.token_urlsafe(16)
        with self.table_lock:
            self.conversations[session] = Conversation(self.vlm, [], self.settings)
            while len(self.conversations) > self.max_sessions:
                self.conversations.popitem(last=False)
        return session

    def get(self, session: str) -> Conversation:
        """The session's conversation, or a 404 naming the fix."""
        with self.table_lock:
            if session not in self.conversations:
                raise PageError(HTTPStatus.NOT_FOUND, "unknown session (the server restarted or dropped it): "
                                                      "reload the page")
            self.conversations.move_to_end(session)
            return self.conversations[session]

    def add_picture(self, session: str, data: bytes) -> int:
        """Check an upload with the model's preprocessing and attach it to the first question; returns the count."""
        conversation = self.get(session)
        try:
            self.vlm.preprocess(data)
        except BadSample as err:
            raise PageError(HTTPStatus.UNPROCESSABLE_ENTITY, f"this picture cannot be used: {err}") from err
        with self.generation_lock:
            if conversation.messages:
                raise PageError(HTTPStatus.CONFLICT, "pictures belong to the first question: press Reset to "
                                                     "start a new conversation with other pictures")
            if len(conversation.images) >= self.max_pictures:
                raise PageError(HTTPStatus.CONFLICT, f"at most {self.max_pictures} pictures per conversation "
                                                     "(--max_pictures)")
            conversation.images.append(data)
            return len(conversation.images)

    def ask(self, session: str, prompt: str, on_text: Callable[[str], None]) -> str:
        """Answer the next question of a session, streaming the reply to `on_text` (waits for other answers)."""
        conversation = self.get(session)
        if not prompt.strip():
            raise PageError(HTTPStatus.BAD_REQUEST, "type a question first")
        with self.generation_lock:
            try:
                return conversation.ask(prompt, on_text)
            except (ValueError, BadSample) as err:  # e.g. <image> placeholders that do not match the pictures
                raise PageError(HTTPStatus.BAD_REQUEST, str(err)) from err

    def reset(self, session: str) -> None:
        """Forget a session's turns and pictures."""
        self.get(session)
        with self.generation_lock, self.table_lock:
            self.conversations[session] = Conversation(self.vlm, [], self.settings)


class ChatHandler(BaseHTTPRequestHandler):
    """The page's files and the JSON API over one `ChatSessions` (the server's `sessions` attribute)."""

    server: ChatServer
    server_version = "vlm.serve"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        """The page's files and /api/info."""
        path = urlsplit(self.path).path
        if path in PAGE_FILES:
            name, kind = PAGE_FILES[path]
            body = (resources.files("vlm") / "assets" / "chat_page" / name).read_bytes()
            self._send(HTTPStatus.OK, body, f"{kind}; charset=utf-8")
        elif path == "/api/info":
            self._send_json(HTTPStatus.OK, self.server.info())
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        """The API calls; a refusal is JSON {"error"} with its status, a failure of the model a 500."""
        url = urlsplit(self.path)
        sessions = self.server.sessions
        try:
            if url.path == "/api/session":
                self._send_json(HTTPStatus.OK, {"session": sessions.new()})
            elif url.path == "/api/picture":
                session = parse_qs(url.query).get("session", [""])[0]
                sessions.get(session)  # refuse before reading a body that would be thrown away
                count = sessions.add_picture(session, self._body(self.server.max_upload_bytes, "picture"))
                self._send_json(HTTPStatus.OK, {"pictures": count})
            elif url.path == "/api/reset":
                sessions.reset(self._json().get("session", ""))
                self._send_json(HTTPStatus.OK, {"pictures": 0})
            elif url.path == "/api/ask":
                self._ask(self._json())
            else:
                raise PageError(HTTPStatus.NOT_FOUND, f"no such API call: {url.path}")
        except PageError as err:
            self._send_json(err.status, {"error": str(err)})
        except CLIENT_GONE:
            self.log_message("client left before the answer was complete")
        except Exception as err:  # the model failed: the page gets one line, the console the traceback
            traceback.print_exc()
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"the model failed: {err!r}"})

    def _ask(self, request: dict) -> None:
        """Stream the answer as NDJSON; the headers go out with the first piece, so early refusals stay 4xx."""
        started = False

        def write(line: dict) -> None:
            nonlocal started
            if not started:
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", "application/x-ndjson; charset=utf-8")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()  # no length: HTTP/1.0, the body ends when the connection closes
                started = True
            self.wfile.write(json.dumps(line).encode() + b"\n")
            self.wfile.flush()

        try:
            reply = self.server.sessions.ask(str(request.get("session", "")), str(request.get("prompt", "")),
                                             lambda text: write({"text": text}))
        except CLIENT_GONE:
            raise
        except Exception as err:  # once the answer has started, an error can only be a last line
            if not started:
                raise
            if not isinstance(err, PageError):
                traceback.print_exc()
            write({"error": f"the answer stopped: {err}"})
            return
        write({"done": True, "reply": reply})

    def _body(self, limit: int, what: str) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise PageError(HTTPStatus.LENGTH_REQUIRED, f"the {what} came without a Content-Length")
        if int(length) > limit:
            raise PageError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"the {what} is {int(length):,} bytes; the limit is {limit:,} (--max_upload_mb)")
        if int(length) == 0:
            raise PageError(HTTPStatus.BAD_REQUEST, f"the {what} is empty")
        return self.rfile.read(int(length))

    def _json(self) -> dict:
        try:
            request = json.loads(self._body(MAX_JSON_BYTES, "request"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PageError(HTTPStatus.BAD_REQUEST, f"the request is not JSON: {err}") from err
        if not isinstance(request, dict):
            raise PageError(HTTPStatus.BAD_REQUEST, "the request must be a JSON object")
        return request

    def _send_json(self, status: HTTPStatus, payload: dict) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


class ChatServer(ThreadingHTTPServer):
    """A threading HTTP server carrying the sessions and the upload limit its handlers use."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], sessions: ChatSessions, max_upload_bytes: int):
        super().__init__(address, ChatHandler)
        self.sessions, self.max_upload_bytes = sessions, max_upload_bytes

    @property
    def url(self) -> str:
        """The page's address."""
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def info(self) -> dict:
        """What the page needs to know before the first upload."""
        return {"source": self.sessions.vlm.source, "max_upload_bytes": self.max_upload_bytes,
                "max_pictures": self.sessions.max_pictures, "extensions": list(IMAGE_EXTENSIONS)}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vlm.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="exported folder, training out_dir/checkpoint, or .pth")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one (default 8000)")
    p.add_argument("--max_upload_mb", type=float, default=20.0, help="largest picture file accepted (default 20)")
    p.add_argument("--max_pictures", type=int, default=8, help="most pictures per conversation (default 8)")
    add_generation_flags(p)
    add_model_flags(p)
    args = p.parse_args(argv)
    args.settings = settings_from_args(p, args)
    if not 0 <= args.port <= 65535 or args.max_upload_mb <= 0 or args.max_pictures < 1:
        p.error("need 0 <= --port <= 65535, --max_upload_mb > 0, --max_pictures >= 1")
    return args


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: list[str] | None = None) -> int:
    """Load the model, serve the page until Ctrl-C; returns the exit code (2: bad flags, inputs or address)."""
    args = _parse_args(argv)
    try:
        vlm = load_from_args(args)
        server = ChatServer((args.host, args.port), ChatSessions(vlm, args.settings, args.max_pictures),
                            int(args.max_upload_mb * 1024 * 1024))
    except (OSError, ValueError, RuntimeError) as err:
        if args.debug:
            raise
        print(f"error: {err} (--debug shows the traceback)", file=sys.stderr)
        return 2
    if not _is_loopback(args.host):
        print(f"warning: --host {args.host}: anyone who can reach this address can use the model", file=sys.stderr)
    print(f"chat page for {vlm.source}: {server.url} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
