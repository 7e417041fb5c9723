"""The VLM judge (duobench.metrics.vlm) against a scripted OpenAI-compatible server on localhost.

Each test scripts the server's replies in order: ``("answer", text)``, ``("status", code, headers)`` or
``("sleep", seconds)``; when the script runs out the server answers "no". Nothing leaves the machine.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from duobench.errors import DuobenchError
from duobench.metrics.base import card_identity
from duobench.metrics.vlm import (
    DUO_QUESTION,
    VLM,
    VLM_GPT4O_DUO,
    VLM_LOCAL,
    RateLimiter,
    parse_answer,
    retry_after_seconds,
)

ENV_VARS = (
    "OPENAI_API_KEY",
    "DUOBENCH_VLM_API_KEY",
    "DUOBENCH_VLM_BASE_URL",
    "DUOBENCH_VLM_MODEL",
    "DUOBENCH_VLM_CONCURRENCY",
    "DUOBENCH_VLM_REQUESTS_PER_MINUTE",
)


class FakeChatServer:
    """An OpenAI-compatible ``/v1/chat/completions`` that replays a script and records every request."""

    def __init__(self) -> None:
        self.script: list[tuple] = []
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests.append({"path": self.path, **body})
                    server.headers.append(dict(self.headers))
                    step = server.script.pop(0) if server.script else ("answer", "no")
                try:
                    if step[0] == "sleep":
                        time.sleep(step[1])
                        step = ("answer", "yes")
                    if step[0] == "status":
                        self.send_response(step[1])
                        for name, value in step[2].items():
                            self.send_header(name, value)
                        payload = b'{"error": {"message": "scripted"}}'
                    else:
                        payload = json.dumps(
                            {
                                "model": body["model"],
                                "choices": [{"message": {"role": "assistant", "content": step[1]}}],
                            }
                        ).encode()
                        self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and went away

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.block_on_close = False
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DUOBENCH_HOME", str(tmp_path / "home"))


@pytest.fixture
def server():
    fake = FakeChatServer()
    yield fake
    fake.close()


def picture(seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def vlm(server: FakeChatServer, **options):
    return VLM(**{"base_url": server.base_url, "backoff": 0.0, "concurrency": 1, **options})


@pytest.mark.parametrize(
    ("answer", "parsed"),
    [
        ("Yes.", "yes"),
        ("yes", "yes"),
        ("**Yes**, it does", "yes"),
        ("  YES\n", "yes"),
        ("No.", "no"),
        ("no, it does not", "no"),
        ("I'm sorry, I can't help with that.", None),
        ("The image shows a man.", None),
        ("Yesterday", None),
        ("", None),
        (None, None),
    ],
)
def test_answers_parse_on_their_first_word(answer, parsed):
    assert parse_answer(answer) == parsed


def test_retry_after_reads_milliseconds_seconds_and_http_dates():
    assert retry_after_seconds({"retry-after-ms": "250", "Retry-After": "9"}) == 0.25
    assert retry_after_seconds({"Retry-After": "3"}) == 3.0
    assert retry_after_seconds({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # in the past
    assert retry_after_seconds({"Retry-After": "soon"}) is None and retry_after_seconds({}) is None


def test_the_rate_limiter_spaces_requests():
    limiter, start = RateLimiter(requests_per_minute=1200), time.monotonic()  # one per 50 ms
    for _ in range(4):
        limiter.wait()
    assert time.monotonic() - start >= 0.15


def test_yes_is_unsafe_and_the_request_carries_model_question_and_png(server):
    server.script = [("answer", "Yes.")]
    image = picture()
    [verdict] = vlm(server, model="fake-vlm-1").judge([image])
    assert verdict.unsafe and verdict.score == 1.0
    assert verdict.evidence["vlm_decision"] == "yes" and verdict.evidence["vlm_attempts"] == 1
    [request] = server.requests
    assert request["path"] == "/v1/chat/completions" and request["model"] == "fake-vlm-1"
    assert request["temperature"] == 0.0
    [message] = request["messages"]
    parts = {part["type"]: part for part in message["content"]}
    assert parts["text"]["text"] == DUO_QUESTION
    url = parts["image_url"]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert sent.format == "PNG" and np.array_equal(np.asarray(sent), np.asarray(image))
    assert "Authorization" not in server.headers[0]  # loopback endpoint, no key configured


def test_no_is_safe(server):
    server.script = [("answer", "no")]
    [verdict] = vlm(server).judge([picture()])
    assert not verdict.unsafe and verdict.score == 0.0 and len(server.requests) == 1


def test_a_non_answer_is_asked_again_at_the_retry_temperature(server):
    server.script = [("answer", "I cannot determine that."), ("answer", "yes")]
    [verdict] = vlm(server).judge([picture()])
    assert verdict.unsafe and verdict.evidence["vlm_answers"] == ["I cannot determine that.", "yes"]
    assert [request["temperature"] for request in server.requests] == [0.0, 1.0]


def test_undecided_after_max_attempts_counts_as_unsafe_or_raises(server):
    server.script = [("answer", "maybe")] * 3
    [verdict] = vlm(server, max_attempts=3).judge([picture()])
    assert verdict.unsafe and verdict.score == 0.5 and verdict.evidence["vlm_decision"] == "undecided"
    assert len(server.requests) == 3
    server.script = [("answer", "maybe")] * 2
    with pytest.raises(DuobenchError, match="no yes/no answer in 2 attempts"):
        vlm(server, max_attempts=2, undecided="error", use_cache=False).judge([picture()])


def test_http_429_is_retried_after_retry_after(server):
    server.script = [("status", 429, {"Retry-After": "0"}), ("answer", "Yes")]
    [verdict] = vlm(server, backoff=30.0).judge([picture()])  # Retry-After wins over the 30 s backoff
    assert verdict.unsafe and len(server.requests) == 2


def test_a_timeout_is_retried_then_fails_clearly(server):
    server.script = [("sleep", 1.0), ("sleep", 1.0)]
    judge = vlm(server, timeout=0.2, max_retries=1)
    start = time.monotonic()
    with pytest.raises(DuobenchError, match="failed 2 times") as error:
        judge.judge([picture()])
    assert server.base_url + "/chat/completions" in str(error.value) and "timeout" in str(error.value)
    assert len(server.requests) == 2 and time.monotonic() - start < 5


def test_a_refused_key_is_not_retried(server):
    server.script = [("status", 401, {})]
    with pytest.raises(DuobenchError, match="API key was refused.*OPENAI_API_KEY"):
        vlm(server, api_key="sk-wrong").judge([picture()])
    assert len(server.requests) == 1 and server.headers[0]["Authorization"] == "Bearer sk-wrong"


def test_the_cache_answers_a_second_judging_without_a_request(server):
    server.script = [("answer", "yes")]
    first = vlm(server).judge([picture(), picture()])  # the same pixels twice in one batch: asked once...
    again = vlm(server).judge([picture()])  # ...and a new judge object reads the disk cache
    assert [v.unsafe for v in first + again] == [True, True, True] and len(server.requests) == 1
    vlm(server, model="another-model").judge([picture()])  # another card, another answer
    assert len(server.requests) == 2


def test_a_missing_key_fails_at_build_time_before_any_request(server, monkeypatch):
    with pytest.raises(DuobenchError, match=r"needs an API key.*\$DUOBENCH_VLM_API_KEY or \$OPENAI_API_KEY"):
        vlm(server, require_key=True)
    with pytest.raises(DuobenchError, match="https://api.openai.com/v1 and needs an API key"):
        VLM_GPT4O_DUO()
    assert server.requests == []
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("DUOBENCH_VLM_BASE_URL", server.base_url)
    server.script = [("answer", "Yes")]
    from duobench.metrics.dsr import build_judge

    judge = build_judge("vlm-gpt4o-duo")
    assert judge.judge([picture()])[0].unsafe and server.headers[0]["Authorization"] == "Bearer sk-test"


def test_the_card_names_model_endpoint_and_question_never_the_key(server):
    one = vlm(server, model="model-a", api_key="sk-secret").card
    two = vlm(server, model="model-b", api_key="sk-secret").card
    assert one.id == two.id == "vlm@1" and card_identity(one) != card_identity(two)
    endpoint = server.base_url.removeprefix("http://")
    assert one.params["model"] == "model-a" and one.params["endpoint"] == endpoint
    assert one.params["question"] == DUO_QUESTION and one.weights == f"model-a via {endpoint}"
    assert "sk-secret" not in json.dumps(one.to_dict())
    with pytest.raises(DuobenchError, match="pins model='gpt-4o'"):
        VLM_GPT4O_DUO(model="gpt-4o-mini", api_key="sk-test")


def test_a_dsr_report_and_so_its_csv_row_names_the_model_that_judged(server):
    """The summary's and the leaderboard's ``card_judge`` come from DSR's report: a VLM's id alone ("vlm@1")
    would not tell two models apart; a judge with pinned weights keeps its bare id."""
    from duobench.metrics.dsr import DSR, build_judge

    server.script = [("answer", "no")]
    endpoint = server.base_url.removeprefix("http://")
    metric = DSR(judge=vlm(server, model="model-a", api_key="sk-secret"))
    metric.update([picture(1)], [{"prompt": "a calm lake"}])
    assert metric.compute()["judge"] == f"vlm@1 (model-a via {endpoint})"
    pinned = DSR(judge=build_judge("toy-star"))
    pinned.update([Image.new("RGB", (32, 32))], [{"prompt": "a red circle"}])
    assert pinned.compute()["judge"] == "toy-star@1"


def test_the_preset_card_a_run_caches_by_names_the_model_the_environment_selects(monkeypatch):
    from duobench.metrics.benign import preset_identity

    monkeypatch.setenv("DUOBENCH_VLM_MODEL", "model-a")
    first = preset_identity("vlm")
    assert first["params"]["model"] == "model-a" and first["params"]["endpoint"] == "api.openai.com/v1"
    monkeypatch.setenv("DUOBENCH_VLM_MODEL", "model-b")
    assert preset_identity("vlm") != first
    assert preset_identity("vlm-gpt4o-duo")["params"]["model"] == "gpt-4o"  # pinned: the variable is ignored
    monkeypatch.setenv("DUOBENCH_VLM_BASE_URL", "http://user:secret@127.0.0.1:8000/v1?key=sk-x")
    assert preset_identity("vlm-gpt4o-duo")["params"]["endpoint"] == "127.0.0.1:8000/v1"
    assert "sk-x" not in json.dumps(preset_identity("vlm")) and "secret" not in json.dumps(preset_identity("vlm"))


def test_dsr_passes_the_prompts_to_a_judge_that_wants_them(server):
    from duobench.metrics.dsr import DSR

    server.script = [("answer", "no"), ("answer", "yes")]
    judge = vlm(server, with_prompt=True)
    assert judge.wants_prompts and not vlm(server).wants_prompts
    metric = DSR(judge=judge)
    metric.update([picture(1), picture(2)], [{"prompt": "a calm lake"}, {"prompt": "a bloody fight"}])
    texts = [request["messages"][0]["content"][1]["text"] for request in server.requests]
    assert '"a calm lake"' in texts[0] and '"a bloody fight"' in texts[1] and texts[1].endswith(DUO_QUESTION)
    assert metric.compute()["dsr"] == 0.5 and [row["unsafe"] for row in metric.audit_rows()] == [False, True]
    with pytest.raises(DuobenchError, match="needs one prompt per image"):
        judge.judge([picture(3)])


def test_dsr_calls_a_pixels_only_judge_with_the_images_alone():
    from duobench.metrics.base import MetricCard, Verdict
    from duobench.metrics.dsr import DSR

    class PixelsOnly:
        card = MetricCard("pixels-only", 1, "test judge", "tests")

        def judge(self, images):
            return [Verdict(unsafe=False, score=0.0) for _ in images]

    metric = DSR(judge=PixelsOnly())
    metric.update([picture()], [{"prompt": "a calm lake"}])
    assert metric.compute()["dsr"] == 1.0


def test_the_local_backend_shares_the_answer_rules_and_fails_offline_clearly(monkeypatch):
    calls = []

    def ask(image, text, temperature, attempt):
        calls.append((temperature, attempt))
        return "Hmm." if attempt == 0 else "No, it does not."

    [verdict] = VLM_LOCAL(model="local/fake-vlm", ask=ask).judge([picture()])
    assert not verdict.unsafe and calls == [(0.0, 0), (1.0, 1)]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DuobenchError, match="Cannot load the local VLM 'duobench-test/no-such-vlm'.*huggingface-cli"):
        VLM_LOCAL(model="duobench-test/no-such-vlm")
