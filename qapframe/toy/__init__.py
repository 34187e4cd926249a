"""The toy LLaVA shipped with qapframe: a trained few-million-parameter `LlavaForConditionalGeneration`.

``load_toy()`` loads it offline from `TOY_PATH` (safetensors weights plus processor files); a spec
selects it with ``model: {path: toy}`` (the ``toy`` model source). The script that trained it lives outside
the package: ``python -m research.toy.train --out DIR`` in a source checkout (docs/toy.md).
"""

from __future__ import annotations

from pathlib import Path

import torch

TOY_PATH = Path(__file__).resolve().parent / "weights"


def load_toy(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", path: str | Path = TOY_PATH):
    """``(model, processor)`` of the shipped toy (or of a toy the training script saved at ``path``), in eval
    mode, on ``device`` in ``dtype``."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = Path(path)
    if not (path / "model.safetensors").is_file():
        hint = "reinstall qapframe, or from a source checkout run" if path == TOY_PATH else "train one with"
        raise FileNotFoundError(
            f"the toy model's weights are missing from {path}; {hint} `python -m research.toy.train --out {path}`"
        )
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


__all__ = ["TOY_PATH", "load_toy"]
