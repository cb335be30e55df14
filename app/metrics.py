"""The gateway's Prometheus metrics (`GET /metrics`, text format) and its one log line per generation.

Requests by route and status (a middleware: every answer, refusals included); per generation its time to first token
(from the request's arrival, so a wait for a slot counts), inter-token gaps, duration, tokens in, out and reused,
drafted tokens kept and rejected (speculative decoding), the length of its route, and how it ended; generations
holding a slot and requests queued for one; from the swarm client, failovers, steps pushed peer to peer, passed
verification checks, peers banned now, and each peer's decode step as this client observes it (per block, RTT taken
out). Labels are bounded: routes are the API's own paths ("other" for anything else), peers are the ones this client
has seen.

The log line (`app.requests`, INFO) says who (the client's name: an API key's digest or an address, never a key),
what model, how many tokens, the time to first token, the duration, the route's peers and the outcome; never a
prompt or an answer.
"""

from __future__ import annotations

import contextvars
import logging
import secrets
from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

request_log = logging.getLogger("app.requests")
disable_created_metrics()  # no `*_created` series: a scrape holds the figures and nothing else

ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings", "/v1/models",
                    "/health", "/metrics", "/"})
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
GAP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("swarm_gateway_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=registry)
        self.ttft = Histogram("swarm_gateway_time_to_first_token_seconds",
                              "From a generation request's arrival (a wait for a slot included) to its first token",
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.gap = Histogram("swarm_gateway_inter_token_seconds", "Between a generation's consecutive steps",
                             buckets=GAP_BUCKETS, registry=registry)
        self.duration = Histogram("swarm_gateway_generation_seconds", "From arrival to the generation's end",
                                  buckets=LATENCY_BUCKETS, registry=registry)
        self.prompt_tokens = Counter("swarm_gateway_prompt_tokens", "Prompt tokens of generations", registry=registry)
        self.cached_tokens = Counter("swarm_gateway_cached_prompt_tokens",
                                     "Prompt tokens a reused session did not compute again", registry=registry)
        self.completion_tokens = Counter("swarm_gateway_completion_tokens", "Tokens generated", registry=registry)
        self.draft_tokens = Counter("swarm_gateway_draft_tokens", "Speculative decoding's drafted tokens, by outcome "
                                    "(kept: in a completion; rejected: computed and not kept): kept / (kept + "
                                    "rejected) is the drafts' acceptance", ["outcome"], registry=registry)
        for outcome in ("kept", "rejected"):  # both series from the start, at 0
            self.draft_tokens.labels(outcome)
        self.generations = Counter("swarm_gateway_generations", "Generations by how they ended (ok, error, "
                                   "cancelled: the client left, or the code of a refusal at start such as "
                                   "rate_limit_exceeded or queue_timeout)", ["outcome"], registry=registry)
        self.route_peers = Histogram("swarm_gateway_route_peers", "Peers in a generation's route",
                                     buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=registry)
        self.active = Gauge("swarm_gateway_active_generations", "Generations holding a slot", registry=registry)
        self.queued = Gauge("swarm_gateway_queued_requests", "Requests waiting for a slot", registry=registry)
        self._swarm = _SwarmCollector()
        registry.register(self._swarm)

    def watch(self, engine: Any) -> None:
        """Read the slot gauges and the swarm client's figures from the serving engine (once it exists)."""
        self.active.set_function(lambda: engine.admission.active)
        self.queued.set_function(lambda: engine.admission.queued)
        self._swarm.backend = engine.backend

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _SwarmCollector(Collector):
    """The swarm client's own counts, read when scraped (nothing when the backend is not the swarm)."""

    def __init__(self) -> None:
        self.backend: Any = None

    def collect(self) -> Iterable[GaugeMetricFamily]:
        backend = self.backend
        client = getattr(backend, "client", None)
        router = getattr(client, "router", None)
        if router is None:
            return
        yield GaugeMetricFamily("swarm_client_failovers", "Peers replaced mid-session (by replay), all sessions "
                                "closed so far", value=getattr(backend, "failovers", 0))
        yield GaugeMetricFamily("swarm_client_pushed_steps", "Steps of a chain's link computed from the previous "
                                "peer's push (server-to-server), all generations ended so far",
                                value=getattr(backend, "pushed_steps", 0))
        health = router.health
        yield GaugeMetricFamily("swarm_client_verification_checks_passed", "Peers' answers re-computed on another "
                                "replica that matched", value=sum(health.passed_checks().values()))
        yield GaugeMetricFamily("swarm_client_banned_peers", "Peers this client bans now", value=len(router.banned()))
        step = GaugeMetricFamily("swarm_client_peer_step_seconds", "A peer's decode step per block as this client "
                                 "observes it (smoothed, RTT taken out)", labels=["peer"])
        for peer_id in health.known_peers():
            seen = health.view(peer_id).observed_block_seconds
            if seen is not None:
                step.add_metric([peer_id], seen)
        yield step


class RequestCounter:
    """ASGI middleware: every answer counted by route and status, whatever answered it (a route, the guard, an
    error handler); one without an `x-request-id` (a refusal, an error) gets one, as every OpenAI answer has."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = (path if path in ROUTES else "/v1/models/{id}" if path.startswith("/v1/models/")
                 else "/v1/responses/{id}" if path.startswith("/v1/responses/") else "other")

        request_id = secrets.token_hex(8)

        async def counting(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(message["status"])).inc()
                headers = message.get("headers") or []
                if not any(name.lower() == b"x-request-id" for name, _ in headers):
                    message = {**message, "headers": [*headers, (b"x-request-id", request_id.encode())]}
            await send(message)

        token = REQUEST_ID.set(request_id)
        try:
            await self.app(scope, receive, counting)
        finally:
            REQUEST_ID.reset(token)


# the id of the HTTP request being answered (RequestCounter): its x-request-id, its generation's id (usage row, log)
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def request_id() -> str:
    return REQUEST_ID.get() or secrets.token_hex(8)


def log_generation(fields: dict[str, Any]) -> None:
    request_log.info("generation %s", " ".join(f"{key}={value}" for key, value in fields.items()))
