"""Which Linear modules a quantizer touches: name patterns (fnmatch, or ``re:<regex>``) in, names out."""

from __future__ import annotations

import fnmatch
import re

from torch import nn

# Linear layers that stay fp by default: the vision side and the heads (the LLM's Linears are the targets).
# The BERT pooler is a classification head that never touches the hidden states, like lm_head.
# Qwen-VL keeps its vision tower and patch merger(s) under ``model.visual``.
DEFAULT_IGNORE = ["*vision_tower*", "*multi_modal_projector*", "*.visual.*", "*lm_head*", "*pooler*"]


def name_matches(name: str, pattern: str) -> bool:
    """fnmatch on the qualified module name; a ``re:`` prefix makes the rest a regex (``re.search``)."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def select_linears(model: nn.Module, targets: list[str], ignore: list[str]) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` whose name matches a target pattern and no ignore pattern, in module order."""
    for pattern in [*targets, *ignore]:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise ValueError(f"targets/ignore: pattern {pattern!r} is not a valid regex: {exc}") from None
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and any(name_matches(name, p) for p in targets)
        and not any(name_matches(name, p) for p in ignore)
    }


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


__all__ = ["name_matches", "select_linears", "set_module"]
