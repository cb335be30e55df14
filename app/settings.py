"""The gateway's one settings object, read from the environment (names as documented in README).

Auth fails closed: GATEWAY_API_KEYS or GATEWAY_API_KEY_FILE set but holding no key is a start-up error, not a
gateway without auth.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from swarm.model.source import DEFAULT_MODEL_ID

DEFAULT_DB = "~/.local/share/swarm-llm/gateway.db"


def split_list(value: str) -> list[str]:
    return [item for item in re.split(r"[\s,]+", value.strip()) if item]


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", protected_namespaces=(),
                                      hide_input_in_errors=True)  # no keys in a start-up error

    swarm_model: str = Field(DEFAULT_MODEL_ID, description="model to serve: the default, a local dir or a hub id")
    swarm_embedding_model: str | None = Field(None, description="an encoder-only model for /v1/embeddings, e.g. "
                                                                 "all-minilm-l6-v2 (empty: no embeddings)")
    swarm_initial_peers: str = Field("", description="multiaddrs of a swarm to join (space/comma separated); "
                                                     "empty: start an embedded local swarm")
    swarm_allowed_peers: str = Field("", description="route only through these peer ids (space/comma separated); "
                                                     "empty: any peer")
    swarm_verify_rate: float = Field(0.01, ge=0, le=1, description="fraction of decode steps re-checked on another "
                                                                   "replica once a peer has a clean record (a new "
                                                                   "peer's first steps always are); 0: off")
    swarm_push: bool = Field(True, description="hidden states go from peer to peer along a chain (server-to-server "
                                               "push: hops + 1 network legs a token instead of 2 x hops); off: "
                                               "every hop through the gateway")
    swarm_client_identity: str | None = Field(None, description="key file of the gateway's client identity, for "
                                                                "peers that serve an allowlist of clients")
    gateway_api_keys: str | None = Field(None, description="accepted API keys (space/comma separated); unset: no "
                                                           "auth (set but holding no key: a start-up error)")
    gateway_api_key_file: str | None = Field(None, description="file with one accepted API key per line (holding "
                                                               "none, or unreadable: a start-up error)")
    gateway_db: str = Field(DEFAULT_DB, description="the SQLite file of API keys and usage rows (python -m "
                                                    "app.keys manages it), created on first start; empty: no store "
                                                    "(keys from the environment only, nothing metered)")
    gateway_private: bool = Field(False, description="no session is reused across requests (not even within one "
                                                     "key), and a joined swarm needs SWARM_ALLOWED_PEERS")
    gateway_speculative: Literal["auto", "on", "off"] = Field("auto", description="speculative decoding of "
                                                              "one-choice requests (drafts by prompt lookup; the same "
                                                              "tokens): auto: at the steps while fewer than "
                                                              "GATEWAY_SPECULATIVE_BELOW other generations run, or "
                                                              "when a request sends a prediction")
    gateway_speculative_below: int = Field(4, ge=0, description="auto speculative decoding: a generation "
                                                                "drafts at a step only while fewer others than this "
                                                                "run")
    gateway_draft_model: str = Field("", description="a small model sharing the served model's tokenizer, run by "
                                                     "the gateway to draft tokens for speculative decoding where "
                                                     "prompt lookup finds none (a directory, GGUF file or hub id; "
                                                     "empty: prompt lookup only)")
    gateway_draft_kv_tokens: int = Field(32768, ge=128, description="tokens the draft model's caches of all "
                                                                     "generations hold at most (a generation past "
                                                                     "it drafts by prompt lookup only)")
    gateway_cors_origins: str = Field("", description="origins allowed by CORS (space/comma separated, * for any)")
    gateway_max_concurrent: int = Field(32, ge=1, description="concurrent generations; more wait in the queue")
    gateway_max_queued: int = Field(256, ge=0, description="requests that may wait for a generation slot, admitted "
                                                           "round-robin across API keys (0: 429 when none is free)")
    gateway_queue_timeout: float = Field(30.0, gt=0, description="seconds a request may wait for a slot before 429")
    gateway_max_n: int = Field(8, ge=1, description="most choices per request (n, times the prompts of a "
                                                    "/v1/completions request)")
    gateway_max_body_bytes: int = Field(4 << 20, ge=1, description="largest request body; larger is 413, "
                                                                      "refused while it is read")
    gateway_body_timeout: float = Field(30.0, gt=0, description="seconds a request body may take to arrive; "
                                                                "slower is 408")
    gateway_default_max_tokens: int = Field(2048, ge=0, description="max_tokens of a chat request that gives none "
                                                                    "(0: the rest of the context)")
    gateway_sse_keepalive: float = Field(10.0, gt=0, description="seconds a stream may stay silent before it gets "
                                                                 "a keep-alive comment (proxies cut silent streams); "
                                                                 "a stream not started by then is answered 200 at "
                                                                 "once and its start awaited behind keep-alives")
    gateway_responses_kept: int = Field(1000, ge=0, description="conversations of /v1/responses kept in memory for "
                                                                "previous_response_id (the oldest forgotten first)")
    gateway_responses_ttl: float = Field(3600.0, gt=0, description="seconds a kept /v1/responses conversation can "
                                                                   "be continued")
    gateway_max_prompt_chars: int = Field(0, ge=0, description="most characters of a prompt (all messages), "
                                                               "checked before tokenizing (0: 32 per token of the "
                                                               "model's context)")
    gateway_tokenize_threads: int = Field(1, ge=1, description="prompts tokenized (chat template included) at once, "
                                                               "in worker threads off the event loop")
    embedded_num_threads: int = Field(0, ge=0, description="the embedded peer's --num-threads (0: its default, the "
                                                           "CPUs it may run on)")
    embedded_activations: Literal["float32", "int8"] = Field(
        "float32", description="the embedded peer's --activations: int8 multiplies its int8/int4 blocks with int8 "
                               "activations (faster, slightly less faithful; README)")
    embedded_kv_dtype: Literal["auto", "float32", "float16"] = Field(
        "auto", description="the embedded peer's --kv-dtype (auto: float16 caches where its native attention reads "
                            "them, CPU blocks; float32: the caches the exactness tests hold peers to; README)")
    embedded_local_socket: bool = Field(True, description="the gateway's streams to its embedded peers through a "
                                                          "Unix socket in a private directory (false: through the "
                                                          "p2p daemons, as to any other peer)")
    gateway_num_threads: int = Field(0, ge=0, description="torch threads of the gateway's own head computation (0: "
                                                          "one beside an embedded swarm, else torch's default)")
    gateway_head_device: Literal["cpu", "cuda"] = Field("cpu", description="where the gateway computes its model's "
                                                        "embedding and LM head (cuda: on the GPU, in float32 as on "
                                                        "the CPU; an embedding model's stay on the CPU)")
    startup_timeout: float = Field(600.0, gt=0, description="seconds to wait for a complete chain at start-up")

    @property
    def initial_peers(self) -> list[str]:
        return split_list(self.swarm_initial_peers)

    @property
    def allowed_peers(self) -> set[str] | None:
        return set(split_list(self.swarm_allowed_peers)) or None

    _api_keys: set[str] = PrivateAttr(default_factory=set)

    @model_validator(mode="after")
    def _read_api_keys(self) -> GatewaySettings:
        if self.gateway_api_keys is not None:
            listed = set(split_list(self.gateway_api_keys))
            if not listed:
                raise ValueError("GATEWAY_API_KEYS is set but holds no key: unset it to serve without auth")
            self._api_keys |= listed
        if self.gateway_api_key_file is not None:
            self._api_keys |= _read_key_file(self.gateway_api_key_file)
        if self.gateway_private and self.swarm_initial_peers.strip() and not self.swarm_allowed_peers.strip():
            raise ValueError("GATEWAY_PRIVATE joins a swarm only through SWARM_ALLOWED_PEERS: name the peers")
        if self.gateway_head_device == "cuda":
            import torch  # (the swarm's; only for this check)

            if not torch.cuda.is_available():
                raise ValueError("GATEWAY_HEAD_DEVICE=cuda, but torch sees no CUDA device")
        return self

    @property
    def api_keys(self) -> set[str]:
        """The accepted API keys, read once (empty: no auth)."""
        return self._api_keys

    @property
    def cors_origins(self) -> list[str]:
        return split_list(self.gateway_cors_origins)


def _read_key_file(path: str) -> set[str]:
    try:
        keys = {line.strip() for line in Path(path).read_text().splitlines() if line.strip()} if path else set()
    except OSError as e:
        raise ValueError(f"GATEWAY_API_KEY_FILE {path!r} cannot be read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"GATEWAY_API_KEY_FILE {path!r} is not UTF-8 text") from None
    if not keys:
        raise ValueError(f"GATEWAY_API_KEY_FILE {path!r} holds no key: unset it to serve without auth")
    return keys
