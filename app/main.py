"""The gateway app: `uvicorn app.main:app` (zero config: an embedded local swarm of the default model).

With SWARM_INITIAL_PEERS set it joins that swarm as a client and starts nothing locally.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from pydantic import ValidationError

from app.auth import ApiKeys
from app.conversations import ConversationStore
from app.errors import install_error_handlers
from app.guard import RequestGuard
from app.keystore import KeyStore
from app.metrics import GatewayMetrics, RequestCounter
from app.routes import embeddings as _embeddings  # noqa: F401 - registers /v1/embeddings on the router
from app.routes.openai import router
from app.serving import ServingEngine
from app.settings import GatewaySettings
from app.tenants import Access
from swarm import heap

logger = logging.getLogger(__name__)


def _log_to_stderr() -> None:
    """uvicorn configures its own loggers only: the gateway's (app.*, swarm.*: "gateway ready", one line per
    generation) go to stderr at INFO, unless logging was configured otherwise (a root logger with handlers)."""
    if logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("app", "swarm"):
        named = logging.getLogger(name)
        if not named.handlers:
            named.addHandler(handler)
            named.setLevel(logging.INFO)
            named.propagate = False


def create_app(settings: GatewaySettings | None = None, backend=None, embeddings=None) -> FastAPI:
    """Build the app; `backend` (a GenerationBackend) and `embeddings` replace the swarm, for tests."""
    settings = settings or GatewaySettings()
    metrics = GatewayMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async with contextlib.AsyncExitStack() as stack:
            active, embedder = backend, embeddings
            if active is None:
                _log_to_stderr()
                from swarm.client.verification import VerificationPolicy  # the swarm only when really serving
                from swarm.embedded import open_swarm_backend

                active, embedder = await stack.enter_async_context(open_swarm_backend(
                    settings.swarm_model, settings.initial_peers, settings.embedded_num_threads,
                    settings.startup_timeout, embedding_model=settings.swarm_embedding_model or None,
                    client_threads=settings.gateway_num_threads, activations=settings.embedded_activations,
                    kv_dtype=settings.embedded_kv_dtype,
                    local_socket=settings.embedded_local_socket, draft_model=settings.gateway_draft_model,
                    draft_kv_tokens=settings.gateway_draft_kv_tokens,
                    identity=settings.swarm_client_identity, allowed_peers=settings.allowed_peers,
                    head_device=settings.gateway_head_device,
                    verification=VerificationPolicy(rate=settings.swarm_verify_rate), push=settings.swarm_push))
                heap.settle()  # full collections from now on skip the head, tokenizer and templates (swarm.heap)
            stack.callback(access.close)  # the usage rows still queued are written first
            access.open()
            app.state.engine = ServingEngine(active, settings, metrics, access)
            stack.push_async_callback(app.state.conversations.stop)  # background responses end before the engine
            metrics.watch(app.state.engine)
            app.state.embeddings = embedder
            logger.info("gateway ready: serving %s%s", active.model_id,
                        f" and embeddings of {embedder.model_id}" if embedder else "")
            yield

    app = FastAPI(title="swarm-llm gateway", lifespan=lifespan)
    store = _open_store(settings)
    app.state.access = access = Access(ApiKeys(settings.api_keys), store)
    app.state.conversations = ConversationStore(settings.gateway_responses_kept, settings.gateway_responses_ttl)
    install_error_handlers(app)
    # the guard runs before anything reads the body (/docs and /openapi.json need the key too); CORS outside it, so
    # that preflights are answered and refusals carry CORS headers
    app.add_middleware(RequestGuard, access=access, max_body_bytes=settings.gateway_max_body_bytes,
                       body_timeout=settings.gateway_body_timeout)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(RequestCounter, metrics=metrics)  # outermost: it counts the guard's refusals too
    app.include_router(router)

    page = (Path(__file__).parent / "static" / "playground.html").read_bytes()

    @app.get("/", include_in_schema=False)
    async def playground() -> Response:
        """The playground: a chat page and a live map of the swarm (app/static/playground.html). Open without a key:
        it holds no data; what it shows it fetches with the key the user enters."""
        return Response(page, media_type="text/html; charset=utf-8")

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        """Prometheus text format (app.metrics); behind the API key like every path but /health."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/health")
    async def health():
        engine: ServingEngine = app.state.engine
        missing = await engine.backend.missing_blocks()
        return {"status": "ok", "model": engine.backend.model_id, "complete_chain": not missing,
                "missing_blocks": [f"{s}:{e}" for s, e in missing]}

    return app


def _open_store(settings: GatewaySettings) -> KeyStore | None:
    """The key store at GATEWAY_DB. Where none was named and none exists at the default place, and it cannot be
    made there (a read-only home), the gateway runs without (keys from the environment only, nothing metered); a
    named store, or an existing one (it may hold keys), must open."""
    if not settings.gateway_db:
        return None
    try:
        return KeyStore(settings.gateway_db)
    except (OSError, sqlite3.Error) as e:
        if "gateway_db" in settings.model_fields_set or Path(settings.gateway_db).expanduser().exists():
            # a store named, or one that exists (it may hold keys): never serve without it; said in one line
            raise SystemExit(f"the gateway cannot start: the key store GATEWAY_DB={settings.gateway_db} cannot be "
                             f"opened: {e}") from None
        logger.warning("no key store (%s cannot be opened: %s): keys from the environment only, nothing metered",
                       settings.gateway_db, e)
        return None


def _settings() -> GatewaySettings:
    """The environment's settings; invalid ones stop the gateway with one line per error (no traceback)."""
    try:
        return GatewaySettings()
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ())) or 'settings'}: "
                             f"{str(err.get('msg', '')).removeprefix('Value error, ')}" for err in e.errors())
        raise SystemExit(f"the gateway cannot start: {problems}") from None


app = create_app(_settings())
