"""Settings of one peer process; every field is a `--flag` of `python -m swarm.server` and a SWARM_PEER_* variable."""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from swarm.model.source import DEFAULT_MODEL_ID

# MiB/s a peer sends to peers fetching its weights by default: when idle, and while it computes for its sessions.
# benchmarks/fetch.py measures what sending costs a peer's decode on a 2-core machine with the fetcher on the same
# cores: 2 MiB/s keeps ~96% of it, 8 MiB/s ~84%, 32 MiB/s ~62%, unpaced (~54 MiB/s) ~46%.
SHARE_RATE = 32.0
SHARE_RATE_BUSY = 2.0


class PeerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SWARM_PEER_", protected_namespaces=())

    model: str = Field(DEFAULT_MODEL_ID, description="model: the default, gemma3-270m, a local *.gguf file or HF "
                                                     "directory, a hub id, or a content id sha256:<hex> (fetched "
                                                     "from the swarm's peers)")
    model_id: str | None = Field(None, description="name announced in the DHT (default: derived from --model)")
    model_source: str = Field("", description="with --model sha256:<hex>: where to read what no peer of the swarm "
                                             "gives (a local directory or *.gguf file, or a hub id); refused "
                                             "unless its content id is the model's")
    blocks: str | None = Field(None, description="span to serve as START:END, or all (default: chosen by the peer: "
                                                 "as many blocks as fit its memory, where the swarm is weakest; it "
                                                 "moves when the swarm changes)")
    num_blocks: int = Field(0, ge=0, description="without --blocks: how many blocks to serve (0: as many as fit "
                                                 "--memory-budget)")
    memory_budget: float = Field(0.0, ge=0, description="GiB for weights + KV cache, used to size the span without "
                                                        "--blocks (0: half the free RAM on CPU, 90%% of free GPU "
                                                        "memory on CUDA)")
    throughput: str = Field("auto", description="tokens/s per block to announce: auto (measured once, cached on "
                                                "disk), eval (measure again) or a number")
    rebalance_period: float = Field(30.0, gt=0, description="without --blocks: seconds between checks whether the "
                                                            "swarm would be better balanced with this peer elsewhere")
    drain_timeout: float = Field(30.0, ge=0, description="when moving: seconds live sessions may go on before they "
                                                         "are handed off (their clients replay them elsewhere)")
    initial_peers: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                                          description="multiaddrs of DHT nodes to join")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(0, ge=0, le=65535, description="TCP port to listen on (0: any free port)")
    local_socket: str = Field("", description="also take sessions from this host on a Unix socket in this "
                                              "directory (yours, mode 700): DIR/<peer id>.sock; clients given the "
                                              "same directory skip the p2p daemons (swarm.local_socket)")
    identity: str | None = Field(None, description="private key file, for a peer id that survives restarts")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the blocks run (auto: cuda if present)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute dtype of the blocks (auto: bf16/fp16 on CUDA, float32 on CPU)")
    quant: Literal["auto", "none", "int8", "int4", "nf4"] = Field(
        "auto", description="weight quantization of the blocks (auto: nf4 on CUDA; int8 on CPU, int4 for a 4-bit "
                            "GGUF checkpoint like the default model)")
    kv_dtype: Literal["float32", "float16", "auto"] = Field(
        "float32", description="what the sessions' KV caches hold on a float32 CPU span: float32, or float16 (half "
                               "the memory, so twice the tokens in the same budget, and ~0.7x the time of a 64-row "
                               "decode step's attention; keys and values rounded to halves: README); auto: float16 "
                               "where the native attention reads it (float32 CPU blocks, F16C), else float32")
    activations: Literal["float32", "int8"] = Field(
        "float32", description="what int8 and int4 CPU blocks multiply their weights with: float32 (the dequantized "
                               "model's arithmetic) or int8 (quantized per group of 32, as llama.cpp does: a decode "
                               "batch or prefill ~1.5-1.7x faster on 2 cores, a small loss of fidelity; README)")
    num_threads: int = Field(0, ge=0, description="CPU threads to compute with: a span on the native kernel splits "
                                                  "its calls over them, torch on one (0: the CPUs this process may "
                                                  "run on); any other span: torch's threads (0: torch's default)")
    max_sessions: int = Field(64, ge=1, description="concurrent sessions served")
    max_length: int = Field(0, ge=0, description="longest session in tokens (0: the model's context length)")
    max_batch: int = Field(8, ge=1, description="largest batch of one session")
    max_chunk_tokens: int = Field(2048, ge=1, description="most new tokens in one step")
    # 64: a forward of 64 decode rows costs less than two of 32 (the int4 kernel ~270 vs ~250 GFLOP/s on 2 cores);
    # 64 chats through make serve's gateway measured 1.07x (median of 6 interleaved rounds) against 32
    max_batch_sessions: int = Field(64, ge=1, description="decode steps of different sessions run as one batch "
                                                          "(1: no batching)")
    batch_wait_ms: float = Field(20.0, ge=0, description="how long a decode batch may wait for the missing members "
                                                         "of a client's group, or for the other untagged decoding "
                                                         "sessions' next steps")
    prefill_chunk: int = Field(128, ge=1, description="prefill tokens computed at once; batched decodes of other "
                                                      "sessions run between chunks")
    kv_budget_tokens: int = Field(0, ge=0, description="KV cache budget in tokens (0: a quarter of free memory)")
    admission_wait: float = Field(5.0, ge=0, description="seconds a session may wait for KV budget (to open or to "
                                                         "grow) before it is refused")
    idle_timeout: float = Field(300.0, gt=0, description="seconds a session may stay silent before it is freed")
    open_timeout: float = Field(10.0, gt=0, description="seconds a new stream has to send its open message")
    frame_timeout: float = Field(60.0, gt=0, description="seconds the rest of a frame may take once its first byte "
                                                         "arrived, and a client to take an answer")
    max_pending_streams: int = Field(256, ge=1, description="streams not yet sessions (opening, or waiting for "
                                                            "capacity), all clients together")
    max_client_pending: int = Field(0, ge=0, description="streams not yet sessions of one client (0: as many as "
                                                         "--max-sessions)")
    announce_period: float = Field(5.0, gt=0, description="seconds between DHT announcements")
    public_name: str = Field("", description="a name shown to operators and users")
    health_file: str = Field("", description="a file the peer rewrites at each announcement with its state (for "
                                             "`python -m swarm.server.health FILE`, e.g. a container HEALTHCHECK)")
    allowed_clients: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                                            description="serve only these client peer ids (empty: "
                                                                        "anyone)")
    log_level: str = Field("INFO", description="logging level")
    fault_nan_after: int = Field(0, ge=0, description="for fault-tolerance tests only: after this many steps, "
                                                        "answer NaN (0: never)")
    fault_wrong_after: int = Field(0, ge=0, description="for verification tests only: after this many forwards, "
                                                        "answer wrong hidden states of the right shape and scale")
    fault_step_delay: float = Field(0.0, ge=0, description="for routing tests only: seconds every forward sleeps "
                                                           "(a slow peer)")
    fault_push_wrong: bool = Field(False, description="for push tests only: push wrong hidden states to the next "
                                                      "peer of a chain (the client gets the right ones)")
    fault_corrupt_fetch: bool = Field(False, description="for weight-sharing tests only: serve tensor bytes with a "
                                                         "flipped byte")
    share_weights: bool = Field(True, description="serve this model's tensors to peers that fetch it by content id "
                                                  "(with --allowed-clients: to those only)")
    cache_budget: float = Field(0.0, ge=0, description="GiB the store of tensors fetched from the swarm may hold "
                                                       "(least recently used first, never a running peer's span); "
                                                       "0: unbounded")
    share_rate: float = Field(SHARE_RATE, ge=0, description="MiB/s this peer sends, all fetches together, to peers "
                                                         "fetching its weights (0: unpaced; at least 0.1 otherwise)")
    share_rate_busy: float = Field(SHARE_RATE_BUSY, ge=0, description="the same while it computes for its sessions "
                                                                   "(a step within the last second)")
    prefetch: bool = Field(True, description="a model fetched by its content id: fetch a move's new span before the "
                                             "old one drains (off: after it, while nothing is served; for "
                                             "measurements)")

    @field_validator("share_rate", "share_rate_busy")
    @classmethod
    def _share_rate(cls, value: float) -> float:
        if 0 < value < 0.1:  # a 1 MiB chunk held back behind another must arrive within the fetcher's timeout
            raise ValueError("a share rate is 0 (unpaced) or at least 0.1 MiB/s")
        return value

    @field_validator("initial_peers", "allowed_clients", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        """From the environment, a plain list: space- or comma-separated (a JSON list works too)."""
        if isinstance(value, str):
            text = value.strip()
            return json.loads(text) if text.startswith("[") else [v for v in re.split(r"[\s,]+", text) if v]
        return value

    def block_range(self, num_blocks: int) -> tuple[int, int] | None:
        """The span given by --blocks; None when the peer is to choose."""
        if self.blocks is None:
            return None
        if self.blocks == "all":
            return 0, num_blocks
        try:
            start, end = (int(x) for x in self.blocks.split(":"))
        except ValueError:
            raise ValueError(f"--blocks must be START:END, got {self.blocks!r}") from None
        if not 0 <= start < end <= num_blocks:
            raise ValueError(f"--blocks {self.blocks} is outside the model's 0:{num_blocks}")
        return start, end

    def announced_throughput(self) -> float | None:
        """--throughput as a number, None for auto/eval."""
        if self.throughput in ("auto", "eval"):
            return None
        try:
            value = float(self.throughput)
        except ValueError:
            raise ValueError(f"--throughput must be auto, eval or a number, got {self.throughput!r}") from None
        if not value > 0:
            raise ValueError(f"--throughput must be positive, got {value}")
        return value
