"""API keys in the SQLite store, their limits and the usage rows (`app.keystore`, `app.tenants`, `app.keys`).

The store: keys kept only as salted hashes, a revoked key refused on the very next request (revoked by another
connection, as the admin CLI does), keys and usage kept across a restart. The limits: requests and tokens per
minute (racing clients overshoot by at most one request's estimate), a budget per day or month, concurrent
generations; 429 with Retry-After, the OpenAI body naming the limit and x-ratelimit-* headers. The rows: one per
request, counts exact against the answers' `usage`, and never a prompt or an answer.

Over the scripted fake backend of test_gateway, in-process (httpx's ASGI transport).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from app.keys import main as keys_cli
from app.keystore import KeyStore, Limits, period_end, period_start
from app.tenants import Bucket, Tenant, _duration
from tests.unit.test_gateway import REPLY
from tests.unit.test_gateway_admission import Gateway, body, until


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "gateway.db"


def make_key(db: Path, name: str = "alice", **limits) -> tuple[str, str]:
    store = KeyStore(db)
    record, key = store.create(name, Limits(**limits))
    store.close()
    return record.id, key


def rows(db: Path) -> list:
    store = KeyStore(db)
    try:
        return list(store.usage())
    finally:
        store.close()


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


async def post(gateway: Gateway, key: str, path: str = "/v1/chat/completions", **overrides):
    payload = body("hi", **{"max_tokens": 5, **overrides}) if path != "/v1/responses" else {
        "model": "fake/model-1", "input": "hi", "max_output_tokens": 5, **overrides}
    return await gateway.http.post(path, json=payload, headers=auth(key))


# ---- the store --------------------------------------------------------------------------------------------------
def test_keys_are_stored_as_salted_hashes_and_checked_whole(db):
    store = KeyStore(db)
    record, key = store.create("alice", Limits(rpm=5))
    _, other = store.create("bob")
    assert key.startswith(f"sk-{record.id}-") and len(key) > 40
    assert store.verify(key) == record
    secret = key.split("-", 2)[2]  # the secret may hold "-" itself
    for wrong in (key[:-1] + ("A" if key[-1] != "A" else "B"), f"sk-{record.id}-{other.split('-', 2)[2]}",
                  f"sk-{record.id}-", "sk--" + secret, key + "x", "", "Bearer", "sk-" + "9" * 40 + "-x"):
        assert store.verify(wrong) is None, wrong
    store.close()
    raw = b"".join(p.read_bytes() for p in db.parent.iterdir() if p.name.startswith(db.name))
    assert secret.encode() not in raw and key.encode() not in raw
    assert record.id.encode() in raw  # the id is not a secret: it finds the row


def test_a_restart_keeps_keys_limits_and_usage(db):
    key_id, key = make_key(db, rpm=7, budget=100.0, budget_period="month")
    store = KeyStore(db)
    assert store.verify(key).limits == Limits(rpm=7, budget=100.0, budget_period="month")
    assert store.revoke(key_id) and not store.revoke(key_id)
    assert store.verify(key) is None and store.get(key_id).revoked is not None
    assert store.has_keys()  # a revoked key still counts: revoking every key must not open the gateway


def test_limits_refuse_nonsense():
    for bad in ({"rpm": 0}, {"tpm": -1}, {"budget": 0.0}, {"budget_period": "week"}, {"prompt_weight": -1.0},
                {"max_concurrent": 1.5}, {"prompt_weight": float("inf")}, {"completion_weight": float("nan")},
                {"budget": float("inf")}):  # an infinite weight made every cost inf and the budget check NaN
        with pytest.raises(ValueError):
            Limits(**bad)


# ---- the limit arithmetic ---------------------------------------------------------------------------------------
def test_a_bucket_refills_over_a_minute():
    bucket = Bucket(60, now=0.0)
    bucket.level = 0.0
    bucket.refill(10.0)
    assert bucket.level == pytest.approx(10.0)
    bucket.refill(1000.0)
    assert bucket.level == 60.0
    assert bucket.seconds_until(61) == pytest.approx(1.0)
    assert [_duration(s) for s in (0.02, 1.0, 59.2, 360.0)] == ["20ms", "1s", "1m0s", "6m0s"]


def test_a_clock_set_back_does_not_drain_a_bucket():
    bucket = Bucket(60, now=1000.0)
    bucket.level = 30.0
    bucket.refill(1000.0 - 3600.0)  # the wall clock stepped back an hour: it was a 3,600-unit debt
    assert bucket.level == 30.0
    bucket.refill(1000.0 - 3600.0 + 10.0)  # and it counts on from where the clock now is
    assert bucket.level == pytest.approx(40.0)


def test_tokens_per_minute_take_the_estimate_and_give_back_the_rest():
    from app.keystore import KeyRecord
    tenant = Tenant(KeyRecord("k", "k", 0.0, None, Limits(tpm=100)))
    tenant.update(tenant.record, now=0.0)
    with pytest.raises(Exception) as large:  # more than the limit itself: never admitted, whatever is left
        tenant.admit(tokens=150, cost=150.0, now=0.0)
    assert large.value.status == 429 and "too large" in large.value.message and large.value.retry_after is None
    reservation = tenant.admit(tokens=80, cost=80.0, now=0.0)  # 20 left
    with pytest.raises(Exception) as refused:
        tenant.admit(tokens=30, cost=30.0, now=0.0)
    assert refused.value.status == 429 and refused.value.code == "rate_limit_exceeded"
    assert refused.value.retry_after == 6  # 10 more tokens, at 100 a minute
    tenant.settle(reservation, tokens=20, cost=20.0, now=0.0)  # it used 20 of its 80
    assert tenant.tokens.level == pytest.approx(80.0) and tenant.active == 0
    tenant.admit(tokens=30, cost=30.0, now=0.0)


async def test_a_request_without_a_token_limit_is_answered_within_what_its_key_has_left(db):
    """No max_tokens: the default limit is cut to the key's budget and tokens per minute left, and the answer ends
    there ("length") instead of spending past them; with max_tokens set beyond it: 429, as before."""
    _, key = make_key(db, budget=40.0, tpm=1000)
    async with Gateway(gateway_db=str(db)) as gateway:
        gateway.backend.gate.set()
        cut = await gateway.http.post("/v1/chat/completions", json=body("hi", n=2, max_tokens=None), headers=auth(key))
        asked = await post(gateway, key, max_tokens=30)
    assert cut.status_code == 200, cut.text
    assert cut.json()["usage"]["completion_tokens"] == 2 * ((40 - 19) // 2)  # 19 prompt tokens; 10 tokens a choice
    assert {c["finish_reason"] for c in cut.json()["choices"]} == {"length"}
    assert asked.status_code == 429 and asked.json()["error"]["code"] == "insufficient_quota"
    assert sum(row.cost for row in rows(db)) <= 40
    # the refusal's x-request-id is its usage row's request id
    assert [row.request_id for row in rows(db) if row.status == "insufficient_quota"] == [
        asked.headers["x-request-id"]]


async def test_a_request_without_a_token_limit_waits_for_the_tokens_per_minute_it_may_take(db):
    """Under tokens per minute, no max_tokens: cut to the limit (not to what is left this instant, which a running
    request may hold): a second one while the first holds the bucket is a 429 with its Retry-After, not "too large"
    and not a few tokens' answer."""
    _, key = make_key(db, tpm=200)
    async with Gateway(gateway_db=str(db)) as gateway:
        first = asyncio.ensure_future(gateway.http.post("/v1/chat/completions", json=body("hi", max_tokens=None),
                                                        headers=auth(key)))
        await until(lambda: gateway.engine.active == 1)
        second = await gateway.http.post("/v1/chat/completions", json=body("hi", max_tokens=None), headers=auth(key))
        gateway.backend.gate.set()
        first = await first
    assert first.status_code == 200 and first.json()["choices"][0]["finish_reason"] == "stop"
    assert second.status_code == 429 and second.json()["error"]["code"] == "rate_limit_exceeded"
    assert "too large" not in second.json()["error"]["message"] and int(second.headers["retry-after"]) > 0


async def test_a_generation_the_swarm_failed_before_any_answer_is_not_billed(db):
    """A 5xx with nothing answered costs its key nothing (as OpenAI bills no 5xx); one that failed after some tokens
    pays for its prompt and those."""
    _, key = make_key(db, budget=1000.0)
    async with Gateway(gateway_db=str(db)) as gateway:
        gateway.backend.gate.set()
        gateway.backend.fail_after = 0
        failed = await post(gateway, key)
        gateway.backend.fail_after = 2
        partial = await post(gateway, key, stream=True)
    assert failed.status_code >= 500 and "error" in partial.text
    first, second = rows(db)
    assert (first.status, first.cost, first.completion_tokens) == ("swarm_error", 0.0, 0)
    assert second.status == "error" and second.completion_tokens == 2 and second.cost == 19 + 2


def test_budget_periods_are_utc_days_and_months():
    at = 1_796_000_000.0  # 2026-11-30T...Z
    assert period_start("day", at) == 1_795_996_800.0
    assert period_end("day", at) == 1_795_996_800.0 + 86400
    assert period_start("month", at) == 1_793_491_200.0  # 2026-11-01
    assert period_end("month", at) == 1_796_083_200.0  # 2026-12-01


# ---- the gateway ------------------------------------------------------------------------------------------------
async def test_a_store_key_is_served_and_a_revoked_one_refused_on_the_next_request(db):
    key_id, key = make_key(db)
    async with Gateway(gateway_db=str(db)) as gateway:
        gateway.backend.gate.set()
        assert (await post(gateway, key)).status_code == 200
        assert (await post(gateway, "sk-nokey-nosecret")).status_code == 401
        assert (await gateway.http.get("/v1/models")).status_code == 401
        other = KeyStore(db)  # the admin CLI's connection
        other.revoke(key_id)
        refused = await post(gateway, key)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        _, fresh = make_key(db, "bob")  # a key made while it runs works at once
        assert (await post(gateway, fresh)).status_code == 200


async def test_environment_keys_keep_working_beside_the_store(db):
    _, key = make_key(db)
    async with Gateway(gateway_db=str(db), gateway_api_keys="legacy-key") as gateway:
        gateway.backend.gate.set()
        assert (await post(gateway, key)).status_code == 200
        assert (await post(gateway, "legacy-key")).status_code == 200
    legacy = [row for row in rows(db) if row.key_id.startswith("env-")]
    assert len(legacy) == 1 and "legacy" not in legacy[0].key_id


async def test_requests_per_minute_answer_429_with_retry_after_and_openai_headers(db):
    _, key = make_key(db, rpm=3, tpm=10_000)
    async with Gateway(gateway_db=str(db)) as gateway:
        gateway.backend.gate.set()
        answers = [await post(gateway, key) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    first, refused = answers[0], answers[3]
    assert first.headers["x-ratelimit-limit-requests"] == "3"
    assert first.headers["x-ratelimit-remaining-requests"] == "2"
    assert first.headers["x-ratelimit-limit-tokens"] == "10000"
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert "3 requests per minute" in error["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 20
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    statuses = [row.status for row in rows(db)]
    assert statuses == ["ok", "ok", "ok", "rate_limit_exceeded"]


async def test_racing_clients_overshoot_tokens_per_minute_by_at_most_one_request(db):
    limit, max_tokens = 300, 5
    _, key = make_key(db, tpm=limit)
    async with Gateway(gateway_db=str(db), gateway_max_concurrent=64) as gateway:
        gateway.backend.gate.set()
        answers = await asyncio.gather(*(post(gateway, key, max_tokens=max_tokens) for _ in range(60)))
    ok = [a.json()["usage"]["total_tokens"] for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code == 429]
    assert ok and refused and len(ok) + len(refused) == 60
    one_request = 19 + max_tokens  # this prompt's tokens + max_tokens: one request's estimate
    assert sum(ok) <= limit + one_request
    assert sum(ok) >= limit - one_request  # and the limit is not under-used: unused estimates are given back


async def test_concurrent_generations_are_limited_per_key(db):
    _, key = make_key(db, max_concurrent=2)
    _, other = make_key(db, "bob")
    async with Gateway(gateway_db=str(db)) as gateway:
        held = [await gateway.hold("a", key), await gateway.hold("b", key)]
        third = await post(gateway, key)
        assert third.status_code == 429 and "2 generations running" in third.json()["error"]["message"]
        bob = gateway.post("c", other)  # another key is not held back
        gateway.backend.gate.set()
        assert [(await t).status_code for t in [*held, bob]] == [200, 200, 200]
        assert (await post(gateway, key)).status_code == 200


async def test_a_budget_is_spent_by_weighted_tokens_and_kept_across_a_restart(db):
    _, key = make_key(db, budget=50.0, budget_period="day", prompt_weight=1.0, completion_weight=2.0)
    async with Gateway(gateway_db=str(db)) as gateway:
        gateway.backend.gate.set()
        first = await post(gateway, key)  # 19 prompt + 2 × 5 completion = 29
        second = await post(gateway, key)  # 29 spent + up to 29 more > 50: refused, not overspent
        third = await post(gateway, key, max_tokens=1)  # 29 + 19 + 2 = 50: within the budget
        fourth = await post(gateway, key, max_tokens=1)
    assert [a.status_code for a in (first, second, third, fourth)] == [200, 429, 200, 429]
    assert first.json()["usage"] == {**first.json()["usage"], "prompt_tokens": 19, "completion_tokens": 5}
    error = second.json()["error"]
    assert error["type"] == error["code"] == "insufficient_quota" and "21 of its budget of 50" in error["message"]
    assert 0 < int(second.headers["retry-after"]) <= 86400
    assert [row.cost for row in rows(db)] == [29.0, 0.0, 21.0, 0.0]
    async with Gateway(gateway_db=str(db)) as gateway:  # a restart reads the day's spending back
        assert (await post(gateway, key)).json()["error"]["code"] == "insufficient_quota"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/responses"])
async def test_usage_rows_match_the_answers_usage_and_hold_no_text(db, path, stream):
    key_id, key = make_key(db)
    extra: dict = {"stream": stream}
    if path == "/v1/completions":
        extra = {**extra, "prompt": "the secret prompt", "n": 2}
    elif path == "/v1/chat/completions":
        extra = {**extra, "messages": [{"role": "user", "content": "the secret prompt"}]}
    else:
        extra = {**extra, "input": "the secret prompt"}
    if stream and path != "/v1/responses":
        extra["stream_options"] = {"include_usage": True}
    async with Gateway(gateway_db=str(db)) as gateway:
        gateway.backend.gate.set()
        gateway.backend.cached = 4
        answer = await post(gateway, key, path, **extra)
    assert answer.status_code == 200
    usage = _usage_of(answer.text, stream)
    [row] = rows(db)
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    cached = (usage.get("prompt_tokens_details") or usage.get("input_tokens_details"))["cached_tokens"]
    assert (row.key_id, row.endpoint, row.model, row.status) == (key_id, path, "fake/model-1", "ok")
    assert (row.prompt_tokens, row.completion_tokens, row.cached_tokens) == (prompt, completion, cached)
    assert cached == 4 and completion >= 5
    assert row.request_id == answer.headers["x-request-id"]
    raw = b"".join(p.read_bytes() for p in db.parent.iterdir() if p.name.startswith(db.name))
    assert b"secret prompt" not in raw and REPLY[:5].encode() not in raw


def _usage_of(text: str, stream: bool) -> dict:
    if not stream:
        return json.loads(text)["usage"]
    datas = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    last = datas[-1]
    return last["response"]["usage"] if "response" in last else last["usage"]


async def test_private_mode_reuses_no_session(db):
    async with Gateway(gateway_db=str(db), gateway_private=True) as gateway:
        gateway.backend.gate.set()
        await gateway.http.post("/v1/chat/completions", json=body("hi"))
    assert [r.tenant for r in gateway.backend.requests] == [None]
    async with Gateway(gateway_db=str(db)) as gateway:
        gateway.backend.gate.set()
        await gateway.http.post("/v1/chat/completions", json=body("hi"))
    assert [r.tenant for r in gateway.backend.requests] == ["addr:127.0.0.1"]


def test_the_admin_cli_refuses_nonsense_in_one_line(db, tmp_path, capsys):
    assert keys_cli(["--db", str(db), "create", "  "]) == 2
    assert keys_cli(["--db", str(tmp_path), "create", "alice"]) == 1  # a directory: no store there
    assert keys_cli(["--db", str(db), "create", "bob", "--prompt-weight", "inf"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["a key needs a name", f"the key store {tmp_path} cannot be opened: unable to open "
                                "database file", "weights must be finite and non-negative"]


def test_the_admin_cli_creates_lists_limits_revokes_and_reports(db, capsys):
    assert keys_cli(["--db", str(db), "create", "alice", "--rpm", "60", "--budget", "1000"]) == 0
    out = capsys.readouterr().out
    key_id = out.split("id:")[1].split()[0]
    key = out.split("key:")[1].split()[0]
    assert KeyStore(db).verify(key).limits == Limits(rpm=60, budget=1000.0)
    assert keys_cli(["--db", str(db), "limits", key_id, "--rpm", "0", "--tpm", "500"]) == 0
    assert KeyStore(db).get(key_id).limits == Limits(tpm=500, budget=1000.0)
    assert keys_cli(["--db", str(db), "limits", key_id, "--rpm", "-3"]) == 2
    capsys.readouterr()
    assert keys_cli(["--db", str(db), "list", "--format", "json"]) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert (listed["id"], listed["name"], listed["tpm"], listed["revoked"]) == (key_id, "alice", 500, "")
    assert key not in json.dumps(listed)
    assert keys_cli(["--db", str(db), "revoke", key_id]) == 0 and keys_cli(["--db", str(db), "revoke", key_id]) == 1
    assert KeyStore(db).verify(key) is None


async def test_the_usage_report_sums_per_key_and_period(db, capsys):
    _, alice = make_key(db, "alice")
    _, bob = make_key(db, "bob")
    async with Gateway(gateway_db=str(db)) as gateway:
        gateway.backend.gate.set()
        for key in (alice, alice, bob):
            assert (await post(gateway, key)).status_code == 200
    assert keys_cli(["--db", str(db), "usage", "--by", "all", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "key_id,name,period,requests,prompt_tokens,completion_tokens,cached_tokens,cost,not_ok"
    by_name = {line.split(",")[1]: line.split(",") for line in lines[1:]}
    assert by_name["alice"][3:6] == ["2", "38", "10"] and by_name["bob"][3:6] == ["1", "19", "5"]
    assert keys_cli(["--db", str(db), "usage"]) == 0
    assert "ALICE" not in (table := capsys.readouterr().out) and "alice" in table and "PERIOD" in table


def test_private_mode_refuses_to_join_a_swarm_without_an_allowlist():
    from app.settings import GatewaySettings
    with pytest.raises(ValueError, match="SWARM_ALLOWED_PEERS"):
        GatewaySettings(gateway_private=True, swarm_initial_peers="/ip4/127.0.0.1/tcp/1/p2p/QmX")
    GatewaySettings(gateway_private=True, swarm_initial_peers="/ip4/127.0.0.1/tcp/1/p2p/QmX",
                    swarm_allowed_peers="QmPeer")
    GatewaySettings(gateway_private=True)  # the embedded swarm: its peers are this machine's own


def test_a_default_store_that_cannot_be_opened_is_left_out_but_a_named_one_must_open(tmp_path, monkeypatch):
    from app.main import _open_store
    from app.settings import GatewaySettings
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the store's directory would be
    monkeypatch.delenv("GATEWAY_DB", raising=False)
    settings = GatewaySettings()
    settings.__dict__["gateway_db"] = str(blocked / "gateway.db")  # as if the default were there: not named
    assert "gateway_db" not in settings.model_fields_set
    assert _open_store(settings) is None
    with pytest.raises(SystemExit, match=r"the key store GATEWAY_DB=.* cannot be opened"):
        _open_store(GatewaySettings(gateway_db=str(blocked / "gateway.db")))


def test_an_existing_default_store_that_cannot_be_opened_stops_the_gateway(tmp_path, monkeypatch):
    from app.main import _open_store
    from app.settings import GatewaySettings
    monkeypatch.delenv("GATEWAY_DB", raising=False)
    settings = GatewaySettings()
    settings.__dict__["gateway_db"] = str(tmp_path)  # there, but no database (it may have held keys)
    with pytest.raises(SystemExit, match="cannot be opened"):  # sqlite's or the OS's error, in one line
        _open_store(settings)


async def test_a_request_cancelled_during_its_prefill_pays_for_its_prompt(db):
    _, key = make_key(db, tpm=10_000)
    async with Gateway(gateway_db=str(db)) as gateway:
        task = await gateway.hold("hi", key)  # its first step began, and waits at the gate
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gateway.backend.gate.set()
        for _ in range(100):
            if rows(db):
                break
            await asyncio.sleep(0.02)
    [row] = rows(db)
    assert (row.status, row.prompt_tokens, row.completion_tokens) == ("cancelled", 19, 0)


@pytest.mark.parametrize("where", ["corrupt.db/under-a-file.db", "a-dir", "corrupt.db", "foreign.db"])
def test_a_key_store_that_cannot_open_stops_the_gateway_with_one_line(tmp_path, where):
    import os
    import sqlite3
    import subprocess
    import sys

    (tmp_path / "a-dir").mkdir()
    (tmp_path / "corrupt.db").write_bytes(b"not a database, " * 512)
    with sqlite3.connect(tmp_path / "foreign.db") as foreign:  # another program's table of the same name
        foreign.execute("CREATE TABLE keys (id TEXT, value TEXT)")
    env = {**os.environ, "GATEWAY_DB": str(tmp_path / where)}
    done = subprocess.run([sys.executable, "-c", "import app.main"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"the gateway cannot start: the key store GATEWAY_DB={tmp_path / where} cannot be opened: ")


async def test_a_key_whose_stored_limits_are_invalid_is_refused_and_the_others_served(db, capsys):
    """A row written by hand (an infinite weight, an rpm of 0) is that key's problem: it is refused (401) and left
    out of the list, the gateway goes on serving the others, and the admin CLI can set its limits again."""
    bad_id, bad = make_key(db, "broken")
    _, good = make_key(db, "fine")
    async with Gateway(gateway_db=str(db)) as gateway:
        gateway.backend.gate.set()
        assert (await post(gateway, bad)).status_code == 200  # served, and its tenant tracked
        store = KeyStore(db)
        with store.db:  # what a hand edit does (with the change counter bumped, as the CLI bumps it)
            store.db.execute("UPDATE keys SET completion_weight = 1e999, rpm = 0 WHERE id = ?", (bad_id,))
            store.db.execute("UPDATE meta SET keys_version = keys_version + 1")
        refused = await post(gateway, bad)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert (await post(gateway, good)).status_code == 200
        assert [record.name for record in store.records()] == ["fine"]
        assert keys_cli(["--db", str(db), "limits", bad_id, "--rpm", "5"]) == 0
        assert "were invalid" in capsys.readouterr().err
        assert store.get(bad_id).limits == Limits(rpm=5)
        assert (await post(gateway, bad)).status_code == 200
