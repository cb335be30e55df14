"""The gateway's one settings object, read from the environment (names as documented in README)."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from swarm.model.source import DEFAULT_MODEL_ID


def split_list(value: str) -> list[str]:
    return [item for item in re.split(r"[\s,]+", value.strip()) if item]


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", protected_namespaces=())

    swarm_model: str = Field(DEFAULT_MODEL_ID, description="model to serve: the default, a local dir or a hub id")
    swarm_embedding_model: str | None = Field(None, description="an encoder-only model for /v1/embeddings, e.g. "
                                                                 "all-minilm-l6-v2 (empty: no embeddings)")
    swarm_initial_peers: str = Field("", description="multiaddrs of a swarm to join (space/comma separated); "
                                                     "empty: start an embedded local swarm")
    swarm_allowed_peers: str = Field("", description="route only through these peer ids (space/comma separated); "
                                                     "empty: any peer")
    swarm_client_identity: str | None = Field(None, description="key file of the gateway's client identity, for "
                                                                "peers that serve an allowlist of clients")
    gateway_api_keys: str = Field("", description="accepted API keys (space/comma separated); empty: no auth")
    gateway_api_key_file: str | None = Field(None, description="file with one accepted API key per line")
    gateway_cors_origins: str = Field("", description="origins allowed by CORS (space/comma separated, * for any)")
    gateway_max_concurrent: int = Field(32, ge=1, description="concurrent generations; more wait in the queue")
    gateway_max_queued: int = Field(256, ge=0, description="requests that may wait for a generation slot, admitted "
                                                           "round-robin across API keys (0: 429 when none is free)")
    gateway_queue_timeout: float = Field(30.0, gt=0, description="seconds a request may wait for a slot before 429")
    gateway_max_n: int = Field(8, ge=1, description="largest n (choices per request)")
    embedded_num_threads: int = Field(0, ge=0, description="torch threads of the embedded peer (0: default)")
    gateway_num_threads: int = Field(0, ge=0, description="torch threads of the gateway's own head computation (0: "
                                                          "one beside an embedded swarm, else torch's default)")
    startup_timeout: float = Field(600.0, gt=0, description="seconds to wait for a complete chain at start-up")

    @property
    def initial_peers(self) -> list[str]:
        return split_list(self.swarm_initial_peers)

    @property
    def allowed_peers(self) -> set[str] | None:
        return set(split_list(self.swarm_allowed_peers)) or None

    @property
    def api_keys(self) -> set[str]:
        keys = set(split_list(self.gateway_api_keys))
        if self.gateway_api_key_file:
            keys |= {line.strip() for line in Path(self.gateway_api_key_file).read_text().splitlines() if line.strip()}
        return keys

    @property
    def cors_origins(self) -> list[str]:
        return split_list(self.gateway_cors_origins)
