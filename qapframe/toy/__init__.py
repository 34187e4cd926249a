"""The toy LLaVA shipped with qapframe: a trained few-million-parameter `LlavaForConditionalGeneration`.

``load_toy()`` loads it offline from `TOY_PATH` (safetensors weights plus processor files); a spec
selects it with ``model: {path: toy}``. ``python -m qapframe.toy.train`` reproduces it.
"""

from __future__ import annotations

from pathlib import Path

import torch

TOY_PATH = Path(__file__).resolve().parent / "weights"


def load_toy(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """``(model, processor)`` of the shipped toy, in eval mode, on ``device`` in ``dtype``."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if not (TOY_PATH / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the toy model's weights are missing from {TOY_PATH}; reinstall qapframe or run "
            f"`python -m qapframe.toy.train --out {TOY_PATH}`"
        )
    model = LlavaForConditionalGeneration.from_pretrained(TOY_PATH, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(TOY_PATH)
    return model, processor


__all__ = ["TOY_PATH", "load_toy"]
