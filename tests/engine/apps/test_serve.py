"""`ddpm-engine serve`, started as a real process on 127.0.0.1: the images equal `ddpm-engine sample`'s,
the answers (JSON, PNG grid, server-sent events), the probes and metrics, and behaviour under
faults: bad and hostile input (a poison request beside a valid one, malformed bodies and framing),
a client that goes away, silent and slow clients (dropped by the timeouts while others are served),
too many connections, a full queue, the token, SIGTERM within and past the grace period, a busy port.
The page is driven in a real headless Chromium (the OS package; .ci/run installs it)."""

import base64
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette", reason="the serve extra (pip install -e '.[serve]')")
pytest.importorskip("uvicorn", reason="the serve extra (pip install -e '.[serve]')")

from engine.apps.cli import build_parser, main  # noqa: E402

CLASSES = tuple(f"shape{k}" for k in range(10))
START_S = 90  # a server's start-up (imports, model) on a loaded 2-core machine


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint):
    return make_checkpoint(class_names=CLASSES)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`ddpm-engine serve` in a subprocess (eager backend: no ONNX export at start-up), logs to files."""

    def __init__(self, checkpoint: Path, folder: Path, *flags: str):
        self.port, self.folder = free_port(), folder
        self.stdout, self.stderr = open(folder / "stdout.txt", "w"), open(folder / "stderr.txt", "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "engine.apps.cli", "serve", "--checkpoint", str(checkpoint), "--device", "cpu",
             "--backend", "eager", "--port", str(self.port), "--grace", "20", *flags],
            stdout=self.stdout, stderr=self.stderr, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            try:
                if self.call("GET", "/healthz")[0] == 200:
                    return
            except OSError:
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"the server did not start: {self.log()}")

    def call(self, method: str, path: str, body=None, headers=None, timeout=60):
        """(status, headers, body bytes) of one request on a fresh connection."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            connection.request(method, path, body=data, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def post(self, body, headers=None, timeout=60):
        status, headers, data = self.call("POST", "/v1/images", body, headers, timeout)
        return status, headers, data

    def metric(self, name: str, headers=None) -> float:
        text = self.call("GET", "/metrics", headers=headers)[2].decode()
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.split(" ")[0] == name)

    def wait_for(self, condition, timeout=30.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.05)

    def log(self) -> str:
        if not self.stderr.closed:
            self.stderr.flush()
        return (self.folder / "stderr.txt").read_text()

    def stop(self, sig=signal.SIGTERM, timeout=60) -> int:
        """Signal the server (sig None: it was signalled already) and wait for its exit status."""
        if sig is not None and self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        finally:
            self.stdout.close()
            self.stderr.close()


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    s = Server(checkpoint, tmp_path_factory.mktemp("server"))
    yield s
    assert s.stop() == 0
    assert "Traceback" not in s.log()  # no input of the tests below is a traceback in the log


def decode(png_b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png_b64))))


def open_post(port: int, body: dict, headers=None) -> socket.socket:
    """A POST sent on a raw socket, its answer left unread (a client that may go away)."""
    data = json.dumps(body).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{head}"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def test_images_equal_the_sample_commands(server, checkpoint, tmp_path):
    body = {"classes": ["shape3", 7], "n": 5, "steps": 4, "seed": 11, "guidance": 2.0, "sampler": "ddim", "eta": 0.5}
    status, _, data = server.post(body)
    assert status == 200, data
    answer = json.loads(data)
    assert answer["labels"] == [3, 7, 3, 7, 3] and answer["settings"]["guidance"] == 2.0
    got = np.stack([decode(png) for png in answer["images"]])
    assert main(["sample", "--checkpoint", str(checkpoint), "--device", "cpu", "--backend", "eager", "--no-progress",
                 "--classes", "shape3,7", "-n", "5", "--steps", "4", "--seed", "11", "--guidance", "2",
                 "--sampler", "ddim", "--eta", "0.5", "--out", str(tmp_path / "cli")]) == 0
    want = np.load(tmp_path / "cli" / "samples.npz")["x"]
    assert got.shape == want.shape == (5, 32, 32, 3)
    assert np.abs(got.astype(int) - want).max() <= 1  # float rounding flips at most one level
    assert want.std() > 10  # not a comparison of flat images


def test_a_png_grid_and_a_stream_of_events(server):
    status, headers, data = server.post({"class": "shape2", "n": 4, "steps": 2}, {"Accept": "image/png"})
    assert status == 200 and headers["content-type"] == "image/png"
    assert np.asarray(Image.open(io.BytesIO(data))).shape == (2 + 2 * 34, 2 + 2 * 34, 3)  # a 2 x 2 grid of 32 px
    status, headers, data = server.post({"classes": [1, 2], "n": 3, "steps": 3}, {"Accept": "text/event-stream"})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [(chunk.split("\n")[0].removeprefix("event: "), json.loads(chunk.split("\n")[1].removeprefix("data: ")))
              for chunk in data.decode().strip().split("\n\n")]
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("image") == 3
    assert [e["step"] for kind, e in events if kind == "progress"][-1] == 3
    assert sorted(e["index"] for kind, e in events if kind == "image") == [0, 1, 2]


@pytest.mark.parametrize("body, status, words", [
    ({"classes": ["zebra"]}, 422, "unknown class"),
    ({"n": 10_000}, 422, "out of range"),
    ({"guidance": 101}, 422, "out of range"),
    ({"steps": 0}, 422, "out of range"),
    ({"steps": 1001}, 422, "steps: 1001 exceeds the model's T"),
    ({"sampler": "euler"}, 422, "unknown sampler"),
    ({"seed": -1}, 422, "out of range"),
    ({"threshold": 1.5}, 422, "threshold: 1.5 is out of range"),
    ({"n": "4"}, 422, "n: must be an integer"),
    ({"colour": "red"}, 422, "unknown field"),
    ([1, 2], 422, "JSON object"),
    (b"{not json", 400, "not valid JSON"),
    (b'{"n": 1, "pad": "' + b"x" * 20_000 + b'"}', 413, "over"),
])
def test_invalid_input_is_a_4xx_with_one_line_of_json(server, body, status, words):
    got, headers, data = server.post(body)
    assert got == status and headers["content-type"] == "application/json"
    error = json.loads(data)["error"]
    assert words in error and "\n" not in error


def test_probes_metrics_and_unknown_paths(server):
    assert server.call("GET", "/healthz")[0] == 200
    status, _, data = server.call("GET", "/readyz")
    assert status == 200 and json.loads(data)["engine"] == "eager-fp32"
    status, headers, text = server.call("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("ddpm_queue_depth", "ddpm_active_slots", "ddpm_batch_rows_bucket", "ddpm_request_latency_seconds_count",
                 "ddpm_images_total", "ddpm_images_per_second", "ddpm_rejected_requests_total"):
        assert name in text.decode(), name
    status, _, data = server.call("GET", "/v1/nothing")
    assert status == 404 and json.loads(data) == {"error": "Not Found"}
    assert json.loads(server.call("GET", "/v1/model")[2])["classes"] == list(CLASSES)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "events"])
def test_a_client_that_goes_away_frees_its_slots_at_the_next_step(server, stream):
    cancelled = server.metric("ddpm_cancelled_requests_total")
    headers = {"Accept": "text/event-stream"} if stream else {}
    client = open_post(server.port, {"n": 8, "steps": 1000, "sampler": "ddpm"}, headers)
    server.wait_for(lambda: server.metric("ddpm_active_slots") == 8)
    steps = server.metric("ddpm_engine_steps_total")
    client.close()
    server.wait_for(lambda: server.metric("ddpm_active_slots") == 0, timeout=10)
    assert server.metric("ddpm_cancelled_requests_total") == cancelled + 1
    assert server.metric("ddpm_engine_steps_total") - steps < 200  # long before its 1,000 steps


def test_token_and_full_queue(checkpoint, tmp_path):
    s = Server(checkpoint, tmp_path, "--token", "s3cret", "--max-queue", "1", "--batch-size", "1")
    auth = {"Authorization": "Bearer s3cret"}
    try:
        assert s.call("GET", "/healthz")[0] == 200  # liveness stays open
        status, headers, page = s.call("GET", "/")  # the page is static and asks for the token itself
        assert status == 200 and headers["content-type"].startswith("text/html") and b"Bearer" in page
        for method, path in (("GET", "/readyz"), ("GET", "/metrics"), ("POST", "/v1/images"), ("GET", "/v1/model")):
            status, headers, data = s.call(method, path, {"n": 1} if method == "POST" else None)
            assert status == 401 and "error" in json.loads(data) and "Bearer" in headers["www-authenticate"], path
        for wrong in ("Bearer wrong", "Bearer", "s3cret", "Basic s3cret", "Bearer s3cret2", "Bearer s3cre"):
            assert s.call("GET", "/readyz", headers={"Authorization": wrong})[0] == 401, wrong
        for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):  # RFC 7235: the scheme is case-insensitive
            assert s.call("GET", "/readyz", headers={"Authorization": f"{scheme} s3cret"})[0] == 200, scheme
        # One slot: a 4-image request runs one image and waits with the rest, so the queue (1) is full.
        client = open_post(s.port, {"n": 4, "steps": 1000, "sampler": "ddpm"}, auth)
        s.wait_for(lambda: s.metric("ddpm_queue_depth", auth) == 1)
        status, headers, data = s.post({"n": 1, "steps": 2}, auth)
        assert status == 429 and int(headers["retry-after"]) >= 1 and "queue is full" in json.loads(data)["error"]
        assert s.metric('ddpm_rejected_requests_total{reason="queue_full"}', auth) == 1
        client.close()
        s.wait_for(lambda: s.metric("ddpm_queue_depth", auth) == 0 and s.metric("ddpm_active_slots", auth) == 0)
        assert s.post({"n": 1, "steps": 2}, auth)[0] == 200
    finally:
        assert s.stop() == 0
    assert "Traceback" not in s.log()


def test_sigterm_finishes_in_flight_requests_then_exits_0(checkpoint, tmp_path):
    s = Server(checkpoint, tmp_path, "--grace", "300")  # the drain's bound, far past the request on a loaded machine
    answers = []
    in_flight = threading.Thread(target=lambda: answers.append(s.post({"n": 4, "steps": 300, "sampler": "ddpm"})))
    in_flight.start()
    s.wait_for(lambda: s.metric("ddpm_active_slots") == 4)
    s.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(OSError):  # no longer admitting: the listener is closed
        s.call("GET", "/healthz", timeout=5)
    in_flight.join(60)
    assert s.stop(sig=None) == 0  # the one SIGTERM above: a second one during the drain would kill it
    status, _, data = answers[0]
    assert status == 200 and len(json.loads(data)["images"]) == 4, data
    assert "Traceback" not in s.log()


def test_the_default_bind_is_this_machine_only():
    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.token is None


def chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def fill_the_grid(port: int, folder: Path, token: str | None = None) -> tuple[list, list, list]:
    """The page in a real headless Chromium: pick 3 classes, 3 images each, 5 steps, generate; (its rows,
    its images' widths, the prompts it showed). With `token`, every prompt is answered with it."""
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright (test extra) drives the browser")
    browser_path = chromium()
    if browser_path is None:
        pytest.skip("no Chromium on this machine (.ci/run installs the OS package `chromium`)")
    prompts = []

    def answer(dialog):
        prompts.append(dialog.message)
        dialog.accept(token or "")

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 520})
            page.on("dialog", answer)
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#classes input")
            page.uncheck("#classes input[value='0']")  # classes 1, 2, 3 (0-3 are checked at first)
            page.fill("#per-class", "3")
            page.fill("#steps", "5")
            page.fill("#guidance", "1")
            page.click("#go")
            page.wait_for_function("document.querySelectorAll('img[data-done]').length === 9", timeout=60_000)
            page.wait_for_function("document.getElementById('status').textContent.includes('9 images in')")
            rows = page.eval_on_selector_all("#grid .row span", "spans => spans.map(s => s.textContent)")
            widths = page.eval_on_selector_all("img[data-done]", "imgs => imgs.map(i => i.naturalWidth)")
            page.screenshot(path=str(folder / "page.png"))
        finally:
            browser.close()
    assert Image.open(folder / "page.png").size == (900, 520)
    return rows, widths, prompts


def test_the_page_fills_the_grid_in_a_real_browser(server, tmp_path):
    rows, widths, prompts = fill_the_grid(server.port, tmp_path)
    assert rows == ["shape1", "shape2", "shape3"] and widths == [32] * 9 and prompts == []


def test_the_page_asks_for_the_token_once(checkpoint, tmp_path):
    if chromium() is None:
        pytest.skip("no Chromium on this machine (.ci/run installs the OS package `chromium`)")
    s = Server(checkpoint, tmp_path, "--token", "s3cret")
    try:
        rows, widths, prompts = fill_the_grid(s.port, tmp_path, token="s3cret")
    finally:
        assert s.stop() == 0
    assert rows == ["shape1", "shape2", "shape3"] and widths == [32] * 9
    assert len(prompts) == 1 and "token" in prompts[0]  # once: the page keeps it for /v1/images too


HOSTILE = [  # (body bytes, status, words): what a hostile client sends; never a 5xx, always one line of JSON
    (b"[" * 5000 + b"]" * 5000, 400, "nests"),
    (b'{"n": ' + b"[" * 200 + b"]" * 200 + b"}", 400, "nests"),
    (b'{"seed": null}', 422, "seed: must be"), (b'{"eta": null}', 422, "eta: must be"),
    (b'{"clip_x0": null}', 422, "clip_x0: must be"), (b'{"threshold": null}', 422, "threshold: must be"),
    (b'{"sampler": null}', 422, "sampler"), (b'{"guidance": null}', 422, "guidance: must be"),
    (b'{"classes": null}', 422, "classes"), (b'{"class": null}', 422, "class"),
    (b'{"classes": []}', 422, "classes"), (b'{"classes": [[1]]}', 422, "unknown class"),
    (b'{"classes": ["\u0663"]}', 422, "unknown class"), (b'{"class": "\uff11"}', 422, "unknown class"),
    (b'{"classes": ["' + b"9" * 5000 + b'"]}', 422, "unknown class"), (b'{"classes": [1e400]}', 422, "unknown class"),
    (b'{"eta": NaN}', 422, "not a finite number"), (b'{"guidance": Infinity}', 422, "not a finite number"),
    (b'{"seed": 1e400}', 422, "seed: must be an integer"), (b'{"seed": ' + b"9" * 4000 + b"}", 422, "seed"),
    (b'{"steps": true}', 422, "steps: must be an integer"), (b'{"n": 2.0}', 422, "n: must be an integer"),
    (b'{"guidance": "2"}', 422, "guidance: must be a number"), (b'{"clip_x0": 1}', 422, "clip_x0: must be true"),
    (b'{"steps": 0}', 422, "steps"), (b'{"n": 0}', 422, "n"), (b'{"n": ' + b"9" * 100 + b"}", 422, "n"),
    (b'"just a string"', 422, "JSON object"), (b"\xff\xfe", 400, "not valid JSON"), (b"", 200, None),
]


@pytest.mark.parametrize("body, status, words", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_bodies_are_a_4xx_with_one_line_of_json(server, body, status, words):
    if status == 200:  # an empty body is the defaults: answered, not refused
        body = b'{"n": 1, "steps": 2}'
    got, headers, data = server.call("POST", "/v1/images", body)
    assert got == status and headers["content-type"] == "application/json", data[:200]
    if words is not None:
        error = json.loads(data)["error"]
        assert words in error and "\n" not in error and len(error) < 400, error


POISONS = [{"sampler": "euler"}, {"steps": 1001}, {"steps": 1.5}, {"eta": -1}, {"eta": None}, {"variance": 3},
           {"spacing": "cubic"}, {"guidance": -1}, {"clip_x0": None}, {"threshold": None}, {"threshold": 2},
           {"seed": None}, {"classes": ["zebra"]}, {"n": 10_000}]


def test_a_poison_request_beside_a_valid_one_never_changes_its_answer(server):
    valid = {"classes": [1, 2], "n": 4, "steps": 40, "seed": 3, "sampler": "ddim"}
    alone = json.loads(server.post(valid)[2])["images"]
    answers = []
    running = threading.Thread(target=lambda: answers.append(server.post(valid)))
    running.start()
    server.wait_for(lambda: server.metric("ddpm_active_slots") >= 4)
    for poison in POISONS:  # while the valid one runs: each field's poison, refused alone
        status, _, data = server.post({**valid, **poison})
        assert status == 422 and "\n" not in json.loads(data)["error"], (poison, data)
    running.join(120)
    status, _, data = answers[0]
    assert status == 200 and json.loads(data)["images"] == alone


def raw(port: int, data: bytes, wait_s: float = 10.0) -> bytes:
    """Send raw bytes on a new connection; what the server answers before it closes (or wait_s passes)."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(data)
        conn.settimeout(wait_s)
        received = b""
        try:
            while chunk := conn.recv(65536):
                received += chunk
        except socket.timeout:
            pass
        return received


def json_error_of(answer: bytes) -> tuple[int, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"application/json" in head.lower(), answer[:300]
    return int(head.split()[1]), json.loads(body)["error"]


def test_malformed_framing_is_one_line_of_json_and_a_cut_body_a_quiet_cancel(server):
    status, error = json_error_of(raw(server.port, b"POST /v1/images HTTP/1.1\r\nHost: x\r\n"
                                                   b"Transfer-Encoding: chunked\r\n\r\nzz\r\nnot a chunk\r\n"))
    assert status == 400 and error
    status, error = json_error_of(raw(server.port, b"GARBAGE\x00\x01 / HTTP/9\r\n\r\n"))
    assert status == 400 and error
    cancelled = server.metric("ddpm_cancelled_requests_total")
    with socket.create_connection(("127.0.0.1", server.port)) as conn:  # says 100 bytes, sends 10, leaves
        conn.sendall(b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"n\": 1, ")
        time.sleep(0.3)
    server.wait_for(lambda: server.metric("ddpm_cancelled_requests_total") == cancelled + 1)
    assert server.post({"n": 1, "steps": 2})[0] == 200


def test_silent_and_slow_clients_are_dropped_while_others_are_served(checkpoint, tmp_path):
    s = Server(checkpoint, tmp_path, "--header-timeout", "1", "--body-timeout", "1", "--keep-alive", "1")
    try:
        started = time.monotonic()
        silent = socket.create_connection(("127.0.0.1", s.port))  # sends nothing
        half = socket.create_connection(("127.0.0.1", s.port))    # half a request head
        half.sendall(b"POST /v1/images HTTP/1.1\r\nHost: x\r\n")
        assert s.post({"n": 1, "steps": 2})[0] == 200  # served meanwhile
        for conn in (silent, half):
            conn.settimeout(10)
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
            conn.close()
            if answer:  # the silent one may just be closed; the half one gets a 408
                assert json_error_of(answer)[0] == 408
        assert time.monotonic() - started < 8  # dropped after ~1 s, not kept open
        slow = socket.create_connection(("127.0.0.1", s.port))  # a body at a byte every 0.3 s, never whole
        slow.sendall(b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\n\r\n")
        slow.settimeout(0.3)
        answer = b""
        for byte in b'{"n": 1, "steps": 2, "seed":1'[:29]:
            try:
                slow.sendall(bytes([byte]))
                answer += slow.recv(65536)
            except (socket.timeout, OSError):
                pass
            if answer:
                break
        slow.settimeout(30)
        while not answer.count(b"}") and (chunk := slow.recv(65536)):
            answer += chunk
        slow.close()
        status, error = json_error_of(answer)
        assert status == 408 and "did not arrive" in error
        keep = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)  # an idle keep-alive connection
        keep.request("GET", "/healthz")
        assert keep.getresponse().read() and keep.sock is not None
        time.sleep(2.5)
        keep.sock.settimeout(30)
        assert keep.sock.recv(1) == b""  # closed by the server
        keep.close()
    finally:
        assert s.stop() == 0
    assert "Traceback" not in s.log()


def test_connections_past_the_limit_are_a_503_and_the_server_serves_again(checkpoint, tmp_path):
    s = Server(checkpoint, tmp_path, "--max-connections", "4", "--header-timeout", "60")
    try:
        held = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(4)]
        time.sleep(0.5)
        status, error = json_error_of(raw(s.port, b"", wait_s=30))
        assert status == 503 and "too many connections" in error
        for conn in held:
            conn.close()
        s.wait_for(lambda: s.post({"n": 1, "steps": 2})[0] == 200)
    finally:
        assert s.stop() == 0
    assert "Traceback" not in s.log()


def test_sigterm_past_the_grace_period_answers_503_json_and_exits_0(checkpoint, tmp_path):
    s = Server(checkpoint, tmp_path, "--grace", "2")
    answers, events = [], []
    long = {"n": 2, "steps": 1000, "sampler": "ddpm"}
    plain = threading.Thread(target=lambda: answers.append(s.post(long, timeout=120)))
    streamed = threading.Thread(target=lambda: events.append(s.post(long, {"Accept": "text/event-stream"}, 120)))
    plain.start()
    streamed.start()
    s.wait_for(lambda: s.metric("ddpm_active_slots") == 4)
    s.process.send_signal(signal.SIGTERM)
    plain.join(60)
    streamed.join(60)
    assert s.stop(sig=None) == 0
    status, headers, data = answers[0]
    assert status == 503 and headers["content-type"] == "application/json"
    assert "grace" in json.loads(data)["error"]
    assert events[0][0] == 200 and b"event: error" in events[0][2] and b"grace" in events[0][2]
    log = s.log()
    assert "Traceback" not in log and "terminate called" not in log


def test_a_busy_port_fails_in_one_line_before_any_serving_line(server, checkpoint):
    result = subprocess.run(
        [sys.executable, "-m", "engine.apps.cli", "serve", "--checkpoint", str(checkpoint), "--device", "cpu",
         "--backend", "eager", "--port", str(server.port)], capture_output=True, text=True, timeout=START_S,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1 and "serving" not in result.stdout
    ours = [line for line in result.stderr.splitlines() if line.startswith("ddpm-engine")]
    assert len(ours) == 1 and "could not serve" in ours[0] and "Traceback" not in result.stderr
