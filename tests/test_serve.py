"""vlm.serve: the JSON API over HTTP (streamed answers, upload checks, sessions, reset), then the page itself in a
real headless Chromium against the real `python -m vlm.serve` process.

The browser test needs Debian's chromium + chromium-driver and the `browser` extra (selenium): it installs the
packages with apt-get when missing (root only), else skips with the reason; VLM_REQUIRE_BROWSER=1 (set by
.ci/run) turns that skip into a failure.
"""

from __future__ import annotations

import io
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
from PIL import Image

from tests import browser
from tests.tiny_vlm import count_runs, picture, save_tiny_vlm
from vlm import serve
from vlm.inference import GenerationSettings, load_model

RED, BLUE = (220, 38, 38), (37, 84, 220)
MAX_PIXELS = 100 * 100  # small, so that a 200 x 200 picture is refused like an oversized one in real use
MAX_UPLOAD = 50_000
# A random tiny model with tied embeddings repeats the prompt's last token, the template's newline; a repetition
# penalty makes it say something visible (gibberish, but an answer a browser shows).
PENALTY = 2.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_vision_dir):
    export, _ = save_tiny_vlm(tiny_vision_dir, tmp_path_factory.mktemp("tiny_vlm"))
    return export


@pytest.fixture(scope="module")
def server(tiny):
    """The real server in this process on a free port, over the tiny model."""
    vlm = load_model(tiny, max_pixels=MAX_PIXELS)
    sessions = serve.ChatSessions(vlm, GenerationSettings(max_new_tokens=6, repetition_penalty=PENALTY), max_pictures=2)
    httpd = serve.ChatServer(("127.0.0.1", 0), sessions, MAX_UPLOAD)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(10)


def call(httpd, path: str, body: bytes | dict | None = None, content_type: str = "application/json"):
    """(status, decoded JSON or the raw text) of a GET (no body) or POST."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(httpd.url.rstrip("/") + path, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, kind, raw = response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as err:
        status, kind, raw = err.code, err.headers["Content-Type"], err.read()
    if kind.startswith("application/json"):
        return status, json.loads(raw)
    if kind.startswith("application/x-ndjson"):
        return status, [json.loads(line) for line in raw.decode().splitlines()]
    return status, raw.decode()


def new_session(httpd) -> str:
    status, reply = call(httpd, "/api/session", {})
    assert status == 200
    return reply["session"]


def upload(httpd, session: str, data: bytes):
    return call(httpd, f"/api/picture?session={session}", data, "image/png")


def ask(httpd, session: str, prompt: str):
    return call(httpd, "/api/ask", {"session": session, "prompt": prompt})


def large_picture(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), BLUE).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_page_and_its_info_are_served(server):
    status, page = call(server, "/")
    assert status == 200 and 'id="prompt"' in page and "chat.js" in page
    assert call(server, "/chat.js")[0] == 200 and call(server, "/chat.css")[0] == 200
    status, info = call(server, "/api/info")
    assert status == 200 and info["source"].startswith("hf:") and info["max_upload_bytes"] == MAX_UPLOAD
    assert info["max_pictures"] == 2 and "png" in info["extensions"]
    status, reply = call(server, "/secrets.txt")
    assert status == 404 and "no such page" in reply["error"]


def test_the_answer_streams_in_pieces_and_turns_build_one_conversation(server):
    session = new_session(server)
    assert upload(server, session, picture(RED)) == (200, {"pictures": 1})
    status, lines = ask(server, session, "Describe the shapes.")
    assert status == 200
    *pieces, last = lines
    assert pieces and all(set(line) == {"text"} for line in pieces), lines
    assert last == {"done": True, "reply": "".join(line["text"] for line in pieces)}
    assert last["reply"].strip(), "the tiny model answered nothing"

    status, lines = ask(server, session, "And its colour?")
    assert status == 200 and lines[-1]["done"]
    conversation = server.sessions.get(session)
    assert [m["role"] for m in conversation.messages] == ["user", "assistant"] * 2
    assert conversation.messages[1]["content"] == last["reply"]
    assert conversation.messages[0]["content"].startswith("<image>\n")  # the picture went with the first turn
    ids = conversation.vlm.prompt_ids(conversation.messages[:3], 1)  # the second question's prompt
    assert count_runs(ids, conversation.vlm.model.config.image_token_id) == 1


def test_bad_uploads_are_json_errors_not_tracebacks(server):
    session = new_session(server)
    status, reply = upload(server, session, b"not a picture at all")
    assert status == 422 and "cannot be used" in reply["error"] and "image_decode" in reply["error"]
    status, reply = upload(server, session, large_picture(200))  # 40,000 pixels > MAX_PIXELS, as --max_pixels
    assert status == 422 and "image_too_large" in reply["error"]
    status, reply = upload(server, session, b"\0" * (MAX_UPLOAD + 1))
    assert status == 413 and "--max_upload_mb" in reply["error"]
    status, reply = upload(server, session, b"")
    assert status == 400 and "empty" in reply["error"]
    assert upload(server, "no-such-session", picture(RED))[0] == 404
    assert upload(server, session, picture(RED)) == (200, {"pictures": 1})
    assert upload(server, session, picture(BLUE)) == (200, {"pictures": 2})
    status, reply = upload(server, session, picture(RED))
    assert status == 409 and "--max_pictures" in reply["error"]
    assert len(server.sessions.get(session).images) == 2  # the refused ones were never attached


def test_pictures_after_the_first_question_are_refused_until_reset(server):
    session = new_session(server)
    assert ask(server, session, "Hello?")[0] == 200
    status, reply = upload(server, session, picture(RED))
    assert status == 409 and "Reset" in reply["error"]
    assert call(server, "/api/reset", {"session": session}) == (200, {"pictures": 0})
    assert server.sessions.get(session).messages == []
    assert upload(server, session, picture(RED)) == (200, {"pictures": 1})
    assert call(server, "/api/reset", {"session": session}) == (200, {"pictures": 0})
    assert server.sessions.get(session).images == []  # reset clears the pictures too


def test_bad_questions_are_refused_before_any_answer(server):
    session = new_session(server)
    assert upload(server, session, picture(RED))[0] == 200
    status, reply = ask(server, session, "Left <image> right <image>?")
    assert status == 400 and "placeholder" in reply["error"]
    status, reply = ask(server, session, "   ")
    assert status == 400 and "question" in reply["error"]
    assert ask(server, "no-such-session", "Hi")[0] == 404
    status, reply = call(server, "/api/ask", b"{not json")
    assert status == 400 and "not JSON" in reply["error"]
    assert server.sessions.get(session).messages == []  # nothing was recorded


def test_two_sessions_do_not_mix(server):
    first, second = new_session(server), new_session(server)
    assert upload(server, first, picture(RED)) == (200, {"pictures": 1})
    assert ask(server, first, "Describe it.")[0] == 200
    assert server.sessions.get(second).messages == [] and server.sessions.get(second).images == []
    assert upload(server, second, picture(BLUE)) == (200, {"pictures": 1})  # the first's turn does not count
    call(server, "/api/reset", {"session": second})
    assert len(server.sessions.get(first).messages) == 2


def test_a_client_that_hangs_up_does_not_block_the_next_answer(server):
    session = new_session(server)
    body = json.dumps({"session": session, "prompt": "Describe the shapes."}).encode()
    with socket.create_connection(server.server_address[:2], timeout=10) as raw:
        raw.sendall(b"POST /api/ask HTTP/1.0\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    status, lines = ask(server, new_session(server), "Hello?")
    assert status == 200 and lines[-1]["done"]


def test_main_reports_a_bad_checkpoint_in_one_line(tmp_path, capsys):
    assert serve.main(["--checkpoint", str(tmp_path / "missing"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    with pytest.raises(SystemExit):
        serve.main(["--checkpoint", "x", "--max_pictures", "0"])


@pytest.fixture(scope="module")
def chromium():
    reason = browser.install_packages()
    if reason is not None:
        if os.environ.get("VLM_REQUIRE_BROWSER") == "1":
            pytest.fail(f"VLM_REQUIRE_BROWSER=1 but headless Chromium is not usable: {reason}")
        pytest.skip(f"no headless Chromium (python -m tests.browser install): {reason}")
    driver = browser.headless_chromium()
    yield driver
    driver.quit()


@pytest.fixture
def served_page(tiny, tmp_path):
    """`python -m vlm.serve` itself on a free port: yields its URL, then stops it."""
    log = tmp_path / "serve.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "vlm.serve", "--checkpoint", str(tiny), "--port", "0",
                                 "--max_new_tokens", "8", "--repetition_penalty", str(PENALTY),
                                 "--max_pixels", str(MAX_PIXELS)],
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        try:
            first = lines.get(timeout=120)
        except queue.Empty:
            first = ""
        assert "http://127.0.0.1:" in first, f"no URL printed: {first!r}\n{log.read_text()[-2000:]}"
        yield first.split(": ", 1)[1].split()[0], log
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_chat_page_answers_in_a_headless_browser(chromium, served_page, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, log = served_page
    (tmp_path / "red.png").write_bytes(picture(RED))
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    wait = WebDriverWait(chromium, 60)
    css = lambda selector: chromium.find_elements(By.CSS_SELECTOR, selector)  # noqa: E731

    def answers_done(n):
        return lambda _: len(css('.message.assistant[data-state="done"]')) == n or css("#error:not([hidden])")

    chromium.get(url)
    wait.until(lambda _: chromium.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "yes")
    assert "hf:" in chromium.find_element(By.ID, "source").text

    chromium.find_element(By.ID, "pictures").send_keys(str(tmp_path / "broken.png"))
    wait.until(lambda _: css("#error:not([hidden])"))
    assert "cannot be used" in chromium.find_element(By.ID, "error").text  # a message on the page
    chromium.find_element(By.ID, "pictures").send_keys(str(tmp_path / "red.png"))
    wait.until(lambda _: len(css("#tray img")) == 1)
    assert not css("#error:not([hidden])")

    chromium.find_element(By.ID, "prompt").send_keys("Describe the shapes.")
    chromium.find_element(By.ID, "send").click()
    wait.until(answers_done(1))
    assert not css("#error:not([hidden])"), chromium.find_element(By.ID, "error").text + log.read_text()[-2000:]
    first = css(".message.assistant .text")[0].text
    assert first.strip(), "no answer appeared"
    assert len(css(".message.user img")) == 1  # the picture shown with the first question
    assert not chromium.find_element(By.ID, "pictures").is_enabled()  # pictures belong to the first question

    chromium.find_element(By.ID, "prompt").send_keys("And its colour?")
    chromium.find_element(By.ID, "send").click()
    wait.until(answers_done(2))
    assert [m.text for m in css(".message.user .text")] == ["Describe the shapes.", "And its colour?"]
    assert css(".message.assistant .text")[1].text.strip()

    chromium.find_element(By.ID, "reset").click()
    wait.until(lambda _: not css(".message") and not css("#tray img"))
    assert chromium.find_element(By.ID, "pictures").is_enabled()
    assert chromium.find_element(By.ID, "prompt").get_attribute("value") == ""
