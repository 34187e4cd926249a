"""What a repeated block receives during calibration: one `BlockInput` per sample, and batches of them.

A block input is the block's call (args and kwargs: hidden states, masks, position embeddings) captured
once and re-targeted block after block (`with_hidden`). `coalesce` merges inputs that differ only in
their hidden states into batches, so calibration passes make few large calls instead of many small ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch


@dataclass
class BlockInput:
    """One calibration sample as a module call; ``mask [B, T]`` marks real (non-padding) tokens."""

    args: tuple
    kwargs: dict
    mask: torch.Tensor | None = None
    # f(i, hidden) -> hidden: what the blocks' parent adds after block i (see transformers_internals.between_layers)
    between: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    # A coalesced batch (`coalesce`): rows of the hidden states per original input, in order; None = one input.
    rows: tuple[int, ...] | None = None

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]


BATCH_TOKENS = 16384  # most tokens one coalesced calibration forward carries (activation memory bound)


def _same(a: Any, b: Any) -> bool:
    """Equal call context: tensors equal in shape, dtype and values; containers item by item."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and (a is b or torch.equal(a, b)))
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        return (isinstance(a, Mapping) and isinstance(b, Mapping) and a.keys() == b.keys()
                and all(_same(a[k], b[k]) for k in a))
    return a is b or (type(a) is type(b) and isinstance(a, (int, float, bool, str)) and a == b)


def _context(inp: BlockInput) -> tuple[tuple, dict]:
    """Everything of a call but its hidden states."""
    if inp.args:
        return inp.args[1:], inp.kwargs
    return (), {k: v for k, v in inp.kwargs.items() if k != "hidden_states"}


def _broadcasts(value: Any) -> bool:
    """A context value that serves a batch of any size: no tensor with a batch dimension above 1."""
    if isinstance(value, torch.Tensor):
        return value.dim() <= 1 or value.shape[0] == 1
    if isinstance(value, (tuple, list)):
        return all(_broadcasts(v) for v in value)
    if isinstance(value, Mapping):
        return all(_broadcasts(v) for v in value.values())
    return True


def _mergeable(inp: BlockInput) -> bool:
    hidden = inp.hidden if (inp.args or "hidden_states" in inp.kwargs) else None
    return (isinstance(hidden, torch.Tensor) and hidden.dim() == 3 and hidden.shape[0] == 1 and inp.rows is None
            and inp.between is None and (inp.mask is None or inp.mask.shape == hidden.shape[:2])
            and _broadcasts(_context(inp)))


def coalesce(inputs: list[BlockInput], max_tokens: int | None = None) -> list[BlockInput]:
    """Consecutive inputs that differ only in their hidden states, merged into batches of up to ``max_tokens``.

    Why: calibration runs every block over every input several times; LLM calibration windows (same
    length, no padding) then share masks and position embeddings, and one batched call replaces many
    small ones. Each batch records its ``rows`` so observers still see every input's tokens apart.
    Inputs that cannot merge (a batch dimension in their context, padding masks of other shapes,
    something added between blocks) stay as they are. ``max_tokens`` defaults to `BATCH_TOKENS`.
    """
    max_tokens = BATCH_TOKENS if max_tokens is None else max_tokens
    out: list[BlockInput] = []
    group: list[BlockInput] = []

    def flush() -> None:
        if len(group) == 1:
            out.append(group[0])
        elif group:
            hidden = torch.cat([g.hidden for g in group])
            masks = [g.mask for g in group]
            mask = None if masks[0] is None else torch.cat(masks)
            first = group[0]
            if first.args:
                batch = BlockInput((hidden, *first.args[1:]), first.kwargs, mask, None, tuple([1] * len(group)))
            else:
                batch = BlockInput((), {**first.kwargs, "hidden_states": hidden}, mask, None, tuple([1] * len(group)))
            out.append(batch)
        group.clear()

    for inp in inputs:
        if not _mergeable(inp):
            flush()
            out.append(inp)
            continue
        if group:
            head = group[0]
            fits = (len(group) + 1) * head.hidden.shape[1] <= max_tokens
            same = (inp.hidden.shape == head.hidden.shape and (inp.mask is None) == (head.mask is None)
                    and _same(_context(inp), _context(head)))
            if not (fits and same):
                flush()
        group.append(inp)
    flush()
    return out


def with_hidden(inp: BlockInput, hidden: torch.Tensor, after_block: int) -> BlockInput:
    """``inp`` for the next block: ``hidden`` (block ``after_block``'s output) plus what the parent adds there."""
    if inp.between is not None:
        hidden = inp.between(after_block, hidden)
    if inp.args:
        return BlockInput((hidden, *inp.args[1:]), inp.kwargs, inp.mask, inp.between)
    if "hidden_states" in inp.kwargs:
        return BlockInput((), {**inp.kwargs, "hidden_states": hidden}, inp.mask, inp.between)
    raise RuntimeError("cannot tell which block argument carries the hidden states")


__all__ = ["BATCH_TOKENS", "BlockInput", "coalesce", "with_hidden"]
