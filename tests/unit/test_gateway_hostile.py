"""Hostile HTTP input against the gateway, over the scripted fake backend of test_gateway (no swarm): every bad
request costs only its sender and gets a 4xx with the OpenAI error body and no internals; the key is checked before
the body is read; bodies are bounded in size and in time; prompts are bounded before they are templated, and
templated off the event loop; internals of failures never reach a client.

Run: .venv/bin/python -m pytest tests/unit/test_gateway_hostile.py
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from app.detokenize import ChoiceText
from app.main import create_app
from app.settings import GatewaySettings
from swarm.protocol import ErrorCode, NoChainError, PeerError
from swarm_kernels.sampling import SamplingParams, sample
from tests.unit.test_gateway import FakeBackend
from tests.unit.test_gateway_shapes import FakeEmbeddings

MODEL = "fake/model-1"
SECRET = "/srv/secret/path.py line 7: Traceback"  # what a failure's text may hold: never shown to a client
INTERNALS = re.compile(r"Traceback|\w+Error\(|\w+Exception\(|File \"|codec can't|/srv/secret")


def assert_error(response: httpx.Response, status: int = 400, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(response.json()) == {"error"} and set(error) == {"message", "type", "param", "code"}
    assert error["message"] and not INTERNALS.search(error["message"]), error
    if code is not None:
        assert error["code"] == code, error
    return error


def raw_json(body: dict) -> bytes:
    """Serialized as a hostile client may: lone surrogates as \\u escapes, NaN and Infinity allowed."""
    return json.dumps(body).encode()


class CountingBackend(FakeBackend):
    """Counts tokenizer calls and how many run at once; `encode_delay` makes each take that long (off the GIL)."""

    def __init__(self):
        super().__init__()
        self.encodes = 0
        self.encoded: list[str] = []
        self.running = self.most_running = 0
        self.encode_delay = 0.0
        self.lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        with self.lock:
            self.encodes += 1
            self.encoded.append(text)
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            time.sleep(self.encode_delay)
            return super().encode(text)
        finally:
            with self.lock:
                self.running -= 1


@pytest.fixture
def backend():
    return CountingBackend()


@pytest.fixture
def client(backend):
    app = create_app(GatewaySettings(), backend=backend, embeddings=FakeEmbeddings())
    with TestClient(app) as client:
        yield client


def chat_body(**overrides) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **overrides}


def text_body(**overrides) -> dict:
    return {"model": MODEL, "prompt": "hi", "max_tokens": 3, **overrides}


def embedding_body(**overrides) -> dict:
    return {"model": "fake/embedder", "input": "hi", **overrides}


CHARS = FakeBackend.context_length * 32  # the default prompt size cap: 32 characters per token of context

# (endpoint, body): each must get 400 with the OpenAI error body, and no internals in it.
BAD = {
    "logit_bias key superscript digit": ("chat", chat_body(logit_bias={"²": 1})),
    "logit_bias key double minus": ("chat", chat_body(logit_bias={"--5": 1})),
    "logit_bias key negative": ("chat", chat_body(logit_bias={"-5": 1})),
    "logit_bias key with spaces": ("chat", chat_body(logit_bias={" 5": 1})),
    "logit_bias id past the vocabulary": ("chat", chat_body(logit_bias={"256": 1})),
    "logit_bias id at 10**7 - 1": ("chat", chat_body(logit_bias={str(10**7 - 1): 1})),
    "logit_bias id with 400 digits": ("chat", chat_body(logit_bias={"9" * 400: 1})),
    "logit_bias NaN": ("chat", chat_body(logit_bias={"5": math.nan})),
    "logit_bias too many": ("chat", chat_body(logit_bias={str(i): 1 for i in range(301)})),
    "seed 2**64": ("chat", chat_body(seed=2**64)),
    "seed below -2**63": ("chat", chat_body(seed=-(2**63) - 1)),
    "temperature NaN": ("chat", chat_body(temperature=math.nan)),
    "top_p infinite": ("chat", chat_body(top_p=math.inf)),
    "penalty NaN": ("text", text_body(frequency_penalty=math.nan)),
    "lone surrogate in a message": ("chat", chat_body(messages=[{"role": "user", "content": "a\ud800b"}])),
    "lone surrogate in a text part": ("chat", chat_body(messages=[{"role": "user", "content": [
        {"type": "text", "text": "\udfff"}]}])),
    "lone surrogate in a stop": ("chat", chat_body(stop=["\ud800"])),
    "lone surrogate in a prompt": ("text", text_body(prompt="x\ud800")),
    "lone surrogate in a prompt list": ("text", text_body(prompt=["ok", "\udc00"])),
    "lone surrogate in the model": ("chat", chat_body(model="m\ud800")),
    "lone surrogate in an extra field": ("chat", chat_body(user="\ud800")),
    "lone surrogate in an embedding input": ("embeddings", embedding_body(input=["ok", "\ud800"])),
    "negative prompt token id": ("text", text_body(prompt=[5, -1])),
    "prompt token id past the vocabulary": ("text", text_body(prompt=[256])),
    "prompt token id of 10**30": ("text", text_body(prompt=[[1, 10**30]])),
    "too many messages": ("chat", chat_body(messages=[{"role": "user", "content": "x"}] * 2049)),
    "a message over the size cap": ("chat", chat_body(messages=[{"role": "user", "content": "x" * (CHARS + 1)}])),
    "messages over the size cap together": ("chat", chat_body(messages=[
        {"role": "user", "content": "x" * (CHARS // 2)}] * 3)),
    "a prompt over the size cap": ("text", text_body(prompt=["ok", "y" * (CHARS + 1)])),
    "prompts times n over max_n": ("text", text_body(prompt=["a"] * 5, n=2)),
    "an embedding input over the size cap": ("embeddings", embedding_body(input="z" * (128 * 32 + 1))),
}
PATHS = {"chat": "/v1/chat/completions", "text": "/v1/completions", "embeddings": "/v1/embeddings"}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_requests_get_400_without_internals(client, backend, name):
    endpoint, body = BAD[name]
    response = client.post(PATHS[endpoint], content=raw_json(body), headers={"content-type": "application/json"})
    assert_error(response, 400)
    assert not backend.requests, "a bad request reached the backend"
    assert client.post(PATHS["chat"], json=chat_body()).status_code == 200  # and the next request is served


def test_oversized_prompts_are_refused_before_they_are_tokenized(client, backend):
    for name in ("a message over the size cap", "messages over the size cap together", "a prompt over the size cap"):
        endpoint, body = BAD[name]
        assert_error(client.post(PATHS[endpoint], json=body), 400, "context_length_exceeded")
    assert backend.encodes == 0


@pytest.mark.parametrize(("field", "value"), [("temperature", 1e-300), ("temperature", 5e-324), ("top_p", 1e-300),
                                              ("top_p", 1e-40)])
def test_temperatures_and_top_p_too_small_to_compute_are_greedy(client, backend, field, value):
    """OpenAI accepts any temperature in [0, 2] and top_p in (0, 1]; below float32's reach both mean the most likely
    token (their limit), so they are sent as greedy, never as NaN probabilities."""
    assert client.post(PATHS["chat"], json=chat_body(**{field: value})).status_code == 200
    request = backend.requests[-1]
    params = SamplingParams(request.temperature, request.top_p, seed=1)
    logits = torch.randn(3, 300) * 8
    assert torch.equal(sample(logits, params, params.generator()), logits.argmax(dim=-1))


def test_seeds_of_64_bits_are_accepted(client, backend):
    for seed in (2**64 - 1, -(2**63), 0):
        assert client.post(PATHS["chat"], json=chat_body(seed=seed, temperature=0.5)).status_code == 200
        SamplingParams(0.5, seed=backend.requests[-1].seed).generator()  # what the sampler does with it


def test_logit_bias_ids_inside_the_vocabulary_reach_the_backend(client, backend):
    assert client.post(PATHS["chat"], json=chat_body(logit_bias={"0": -100, "255": 5.5})).status_code == 200
    assert backend.requests[-1].logit_bias == {0: -100, 255: 5.5}


# ---- failures never show their internals ---------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("failure", "status", "code"), [
    (PeerError(SECRET, ErrorCode.INTERNAL), 503, "swarm_error"),
    (PeerError(SECRET, "no-such-code"), 503, "swarm_error"),
    (PeerError(SECRET, ErrorCode.CAPACITY), 503, "overloaded"),
    (NoChainError(MODEL, [(3, 5)]), 503, "no_complete_chain"),
    (RuntimeError(SECRET), 500, "internal_error"),
])
def test_failures_at_start_map_to_codes_without_internals(client, backend, stream, failure, status, code):
    backend.refuse = failure
    error = assert_error(client.post(PATHS["chat"], json=chat_body(stream=stream)), status, code)
    assert SECRET not in error["message"]
    backend.refuse = None
    assert client.post(PATHS["chat"], json=chat_body()).status_code == 200


def test_a_failure_mid_stream_is_an_error_event_without_internals(client, backend):
    backend.fail_after = 2
    backend.reply = "x" * 10
    response = client.post(PATHS["chat"], json=chat_body(stream=True, max_tokens=8))
    events = [json.loads(line[6:]) for line in response.text.split("\n\n") if line.startswith("data: {")]
    error = events[-1]["error"]
    assert error["code"] == "swarm_error" and not INTERNALS.search(error["message"])
    assert "peer died" not in error["message"]  # the peer's own words are logged, not sent


def test_a_tokenizer_that_fails_gives_a_4xx_or_5xx_without_internals(client, backend, monkeypatch):
    def broken(text):
        raise RuntimeError(SECRET)

    monkeypatch.setattr(backend, "encode", broken)
    for path, body in ((PATHS["text"], text_body()), (PATHS["chat"], chat_body())):
        response = client.post(path, json=body)
        assert response.status_code in (400, 500)
        assert SECRET not in assert_error(response, response.status_code)["message"]


# ---- auth fails closed, compares in constant time, comes before the body ---------------------------------------
@pytest.mark.parametrize("settings", [{"gateway_api_keys": ","}, {"gateway_api_keys": " , \n"},
                                      {"gateway_api_keys": ""}])
def test_an_api_key_variable_that_holds_no_key_is_a_startup_error(settings):
    with pytest.raises(ValueError, match="GATEWAY_API_KEYS"):
        GatewaySettings(**settings)


def test_uvicorn_with_invalid_settings_stops_with_one_line_not_a_traceback():
    import os
    import subprocess
    import sys

    env = {**os.environ, "GATEWAY_API_KEYS": " , "}
    done = subprocess.run([sys.executable, "-c", "import app.main"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == ("the gateway cannot start: settings: GATEWAY_API_KEYS is set but "
                                                    "holds no key: unset it to serve without auth")


def test_an_api_key_file_that_holds_no_key_or_is_missing_is_a_startup_error(tmp_path):
    empty = tmp_path / "keys"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="GATEWAY_API_KEY_FILE"):
        GatewaySettings(gateway_api_key_file=str(empty))
    with pytest.raises(ValueError, match="GATEWAY_API_KEY_FILE"):
        GatewaySettings(gateway_api_key_file=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="GATEWAY_API_KEY_FILE"):
        GatewaySettings(gateway_api_key_file="")
    empty.write_text("k1\n\nk2\n")
    assert GatewaySettings(gateway_api_key_file=str(empty), gateway_api_keys="k3").api_keys == {"k1", "k2", "k3"}


def test_the_heads_device_is_read_from_the_environment_and_an_unknown_or_absent_one_refused(monkeypatch):
    import torch

    assert GatewaySettings().gateway_head_device == "cpu"
    monkeypatch.setenv("GATEWAY_HEAD_DEVICE", "cuda")
    if torch.cuda.is_available():
        assert GatewaySettings().gateway_head_device == "cuda"
    else:  # a start-up error, before any model is loaded
        with pytest.raises(ValueError, match="GATEWAY_HEAD_DEVICE=cuda, but torch sees no CUDA device"):
            GatewaySettings()
    monkeypatch.setenv("GATEWAY_HEAD_DEVICE", "gpu0")
    with pytest.raises(ValueError, match="gateway_head_device"):
        GatewaySettings()


def test_environment_with_empty_keys_fails_at_import_of_the_settings(monkeypatch):
    monkeypatch.setenv("GATEWAY_API_KEYS", ",")
    with pytest.raises(ValueError, match="GATEWAY_API_KEYS"):
        GatewaySettings()


@pytest.fixture
def keyed(backend):
    app = create_app(GatewaySettings(gateway_api_keys="key-1 key-2 key-3"), backend=backend)
    with TestClient(app) as client:
        yield client


def test_every_key_is_compared_with_compare_digest(keyed, monkeypatch):
    import hmac

    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    for token, status in (("key-1", 200), ("key-3", 200), ("nope", 401), ("key-", 401)):
        calls.clear()
        response = keyed.post(PATHS["chat"], json=chat_body(), headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == status
        assert len(calls) >= 3, "not every key was compared in constant time"  # no early exit on the first match


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect", "/v1/models"])
def test_docs_and_schema_need_the_key_when_keys_are_set(keyed, path):
    assert_error(keyed.get(path), 401, "invalid_api_key")
    assert keyed.get(path, headers={"Authorization": "Bearer key-2"}).status_code == 200
    assert keyed.get("/health").status_code == 200


def test_odd_authorization_headers_are_401_not_500(keyed):
    for value in ("Bearer ключ".encode(), b"Bearer \xff\xfe", b"bearer", b"Basic a2V5LTE=", b"Bearer  key-1 x"):
        assert_error(keyed.post(PATHS["chat"], json=chat_body(), headers={"Authorization": value}), 401)
    assert keyed.post(PATHS["chat"], json=chat_body(), headers={"Authorization": "bearer key-1"}).status_code == 200


# ---- bodies: the key first, then a bounded size read in bounded time (raw ASGI: the test decides what arrives) --
def asgi_scope(path: str, headers: dict[str, str], method: str = "POST") -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"host", b"test"), (b"content-type", b"application/json"),
                        *((k.lower().encode(), v.encode()) for k, v in headers.items())],
            "client": ("127.0.0.1", 50000), "server": ("test", 80)}


async def asgi_post(app, headers: dict[str, str], chunks: list[bytes], stall: bool = False,
                    path: str = "/v1/chat/completions") -> tuple[list[dict], int]:
    """POST `chunks` as http.request messages (then wait forever when `stall`); return what was sent back and how
    many body messages the app read."""
    sent: list[dict] = []
    read = 0
    hang = asyncio.Event()

    async def receive() -> dict:
        nonlocal read
        if read < len(chunks):
            read += 1
            return {"type": "http.request", "body": chunks[read - 1],
                    "more_body": stall or read < len(chunks)}
        await hang.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            hang.set()

    await asyncio.wait_for(app(asgi_scope(path, headers), receive, send), 5)
    return sent, read


def response_of(sent: list[dict]) -> tuple[int, dict]:
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body)


async def run_app(settings: GatewaySettings, scenario):
    app = create_app(settings, backend=FakeBackend())
    async with app.router.lifespan_context(app):
        return await scenario(app)


def test_the_key_is_checked_before_the_body_is_read():
    async def scenario(app):
        return await asgi_post(app, {}, [], stall=True)  # no body ever arrives

    sent, read = asyncio.run(run_app(GatewaySettings(gateway_api_keys="k"), scenario))
    assert read == 0 and response_of(sent)[0] == 401


def test_a_body_declared_too_large_is_413_before_it_is_read():
    async def scenario(app):
        return await asgi_post(app, {"content-length": str(10**9)}, [], stall=True)

    sent, read = asyncio.run(run_app(GatewaySettings(gateway_max_body_bytes=1000), scenario))
    status, body = response_of(sent)
    assert read == 0 and status == 413 and body["error"]["code"] == "request_too_large"
    assert (b"connection", b"close") in sent[0]["headers"]


def test_a_body_that_grows_past_the_limit_is_413_and_not_read_further():
    padded = json.dumps(chat_body()).encode() + b" " * 3000  # valid JSON: without a limit it would be served

    async def scenario(app):
        return await asgi_post(app, {}, [padded[i:i + 500] for i in range(0, len(padded), 500)])

    sent, read = asyncio.run(run_app(GatewaySettings(gateway_max_body_bytes=1000), scenario))
    assert response_of(sent)[0] == 413 and read == 3  # 1500 bytes read: past the limit, the rest never is


def test_a_body_within_the_limit_is_served():
    body = json.dumps(chat_body()).encode()

    async def scenario(app):
        return await asgi_post(app, {"content-length": str(len(body))}, [body[:10], body[10:]])

    sent, _ = asyncio.run(run_app(GatewaySettings(gateway_max_body_bytes=len(body)), scenario))
    assert response_of(sent)[0] == 200


def test_a_body_that_stalls_is_408_after_the_body_timeout():
    async def scenario(app):
        started = time.monotonic()
        sent, _ = await asgi_post(app, {}, [b'{"model": '], stall=True)
        return sent, time.monotonic() - started

    (sent, elapsed) = asyncio.run(run_app(GatewaySettings(gateway_body_timeout=0.3), scenario))
    assert response_of(sent)[0] == 408 and 0.25 < elapsed < 3


# ---- the event loop is never blocked by a request's input --------------------------------------------------------
def test_tokenization_runs_off_the_event_loop_at_most_n_at_once():
    backend = CountingBackend()
    backend.encode_delay = 0.4
    settings = GatewaySettings(gateway_tokenize_threads=2)

    async def scenario():
        app = create_app(settings, backend=backend)
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport,
                                                                       base_url="http://test") as http:
            posts = [asyncio.create_task(http.post(PATHS["text"], json=text_body())) for _ in range(4)]
            while backend.encodes == 0:
                await asyncio.sleep(0.01)
            started = time.monotonic()
            health = await http.get("/health")
            health_seconds = time.monotonic() - started
            responses = await asyncio.gather(*posts)
            return health, health_seconds, responses

    health, health_seconds, responses = asyncio.run(scenario())
    assert health.status_code == 200 and health_seconds < 0.2, "the event loop waited for a tokenizer"
    assert [r.status_code for r in responses] == [200] * 4
    assert backend.most_running == 2


def test_without_max_tokens_a_chat_is_capped_by_the_default(backend):
    settings = GatewaySettings(gateway_default_max_tokens=10)
    with TestClient(create_app(settings, backend=backend)) as client:
        body = client.post(PATHS["chat"], json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert body.json()["choices"][0]["finish_reason"] == "length"
        assert backend.requests[-1].max_new_tokens == 10
        client.post(PATHS["chat"], json=chat_body(max_tokens=50))  # an explicit max_tokens is the client's
        assert backend.requests[-1].max_new_tokens == 50
    with TestClient(create_app(GatewaySettings(gateway_default_max_tokens=1000), backend=backend)) as client:
        client.post(PATHS["chat"], json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        request = backend.requests[-1]  # never past the context
        assert request.max_new_tokens == FakeBackend.context_length - len(request.prompt_ids)


def test_four_stop_strings_of_the_longest_length_cost_a_bounded_time_per_token():
    """Adversarial stops: each is a long run that the text keeps almost matching, so the most text is held back and
    every end of it compared. The cost per token is bounded by the cap on stop strings, not by the text's length."""
    from app.protocol.requests import MAX_STOP_LENGTH

    half = MAX_STOP_LENGTH // 2
    stops = ["b" + "a" * (MAX_STOP_LENGTH - 1), "ab" * half, "a" * half + "c" * half, "a" * (MAX_STOP_LENGTH - 1) + "b"]
    text = ChoiceText(lambda ids: bytes(ids).decode("utf-8", errors="replace"), stops)
    tokens = 3000
    started = time.process_time()
    out = "".join(text.add(ord("a")) for _ in range(tokens))
    per_token = (time.process_time() - started) / tokens
    assert len(text.pending) < MAX_STOP_LENGTH and len(out) == tokens - len(text.pending)
    assert per_token < 1e-3, f"{per_token * 1e6:.0f} us per token"


def test_a_client_that_leaves_while_its_prompt_waits_for_a_tokenizer_starts_nothing():
    backend = CountingBackend()
    backend.encode_delay = 0.3
    body = json.dumps(text_body(prompt="gone")).encode()

    async def scenario():
        app = create_app(GatewaySettings(gateway_tokenize_threads=1), backend=backend)
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport,
                                                                       base_url="http://test") as http:
            first = asyncio.create_task(http.post(PATHS["text"], json=text_body(prompt="first")))
            while backend.encodes == 0:
                await asyncio.sleep(0.01)
            leave = asyncio.Event()
            received = 0

            async def receive() -> dict:  # the body, then the disconnect once `leave` is set
                nonlocal received
                received += 1
                if received == 1:
                    return {"type": "http.request", "body": body, "more_body": False}
                await leave.wait()
                return {"type": "http.disconnect"}

            async def send(message: dict) -> None:
                pass

            gone = asyncio.create_task(app(asgi_scope(PATHS["text"], {}), receive, send))
            await asyncio.sleep(0.05)  # it waits for the one tokenizer thread
            leave.set()
            await asyncio.wait_for(gone, 5)
            assert (await first).status_code == 200
            await asyncio.sleep(0.4)  # had it not been cancelled, its tokenization would have run by now
            return [backend.decode(r.prompt_ids) for r in backend.requests], backend.encoded

    prompts, encoded = asyncio.run(scenario())
    assert prompts == ["first"] and "gone" not in encoded


def test_the_embedded_peers_activations_are_read_from_the_environment_and_checked(monkeypatch):
    assert GatewaySettings().embedded_kv_dtype == "auto"  # float16 caches where the embedded peer's kernel reads them
    monkeypatch.setenv("EMBEDDED_KV_DTYPE", "float32")
    assert GatewaySettings().embedded_kv_dtype == "float32"
    assert GatewaySettings().embedded_activations == "float32"
    monkeypatch.setenv("EMBEDDED_ACTIVATIONS", "int8")
    assert GatewaySettings().embedded_activations == "int8"
    monkeypatch.setenv("EMBEDDED_ACTIVATIONS", "int2")
    with pytest.raises(ValueError, match="embedded_activations"):
        GatewaySettings()
