"""Calibration plumbing: choose samples, capture what enters each repeated block, run block by block.

`calibrate_sequential` finds the model's repeated blocks (the `nn.ModuleList` of one block class holding
the most target Linears: ``language_model.layers`` in LLaVA, ``encoder.layer`` in BERT), captures the
first block's inputs (args and kwargs: masks, position embeddings) with a pre-hook that stops the
forward, then hands one block at a time to the quantizer and feeds the block's *quantized* output to
the next block. Peak memory is one block plus the calibration activations. Linears outside the blocks
(or every Linear, when no blocks are found) are calibrated by running the whole model.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from qapframe.quantizers.block_inputs import BlockInput, coalesce, with_hidden
from qapframe.quantizers.fake_quant import holding_weights
from qapframe.quantizers.targets import set_module

log = logging.getLogger("qapframe.quantizers")


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the first block needs to run."""


def select_samples(calibration: Iterable[Mapping[str, Any]] | None, count: int | None, seed: int,
                   device: torch.device) -> list[dict]:
    """Up to ``count`` input dicts (a seeded choice when more are given; None = all), tensors moved to ``device``."""
    if calibration is None:
        return []
    samples = list(calibration)
    if count is not None and len(samples) > count:
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))[:count]
        samples = [samples[i] for i in sorted(order.tolist())]
    for i, sample in enumerate(samples):
        if not isinstance(sample, Mapping):
            raise TypeError(f"calibration item {i} must be a dict of model inputs, got {type(sample).__name__}")
    return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in s.items()} for s in samples]


def first_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a module output: a tensor, the first item of a tuple or a ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        return first_tensor(next(iter(output.values())))
    return first_tensor(output[0])


def token_mask(sample: Mapping[str, Any]) -> torch.Tensor | None:
    mask = sample.get("attention_mask")
    return mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def valid_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x [B, T, D]`` -> ``[n, D]``: the tokens the mask marks real (all tokens when shapes differ)."""
    if mask is not None and x.shape[:-1] == mask.shape:
        return x[mask]
    return x.reshape(-1, x.shape[-1])


class BlockData:
    """A module (a block, or the whole model) with its calibration inputs; runs it and observes its Linears."""

    def __init__(self, module: nn.Module, inputs: list[BlockInput]):
        self.module = module
        self.inputs = inputs
        self._mask: torch.Tensor | None = None
        self._rows: tuple[int, ...] | None = None
        self._batches: list[BlockInput] | None = None
        # id(module) -> calls per input, learnt by `input_groups` on the first input; lets a pass stop early.
        self._calls: dict[int, int] = {}
        # Set by a quantizer whose last full pass already ran the block exactly as quantized (one output per
        # input): the next block's inputs are then taken from it instead of another pass.
        self.quantized_outputs: list[torch.Tensor] | None = None

    def calls_per_input(self, module: nn.Module) -> int:
        """How often ``module`` ran for the first input in `input_groups` (0 = not learnt or never called)."""
        return self._calls.get(id(module), 0)

    @property
    def batches(self) -> list[BlockInput]:
        """The inputs coalesced into as few calls as `coalesce` allows."""
        if self._batches is None:
            self._batches = coalesce(self.inputs)
        return self._batches

    def tokens_of(self, x: torch.Tensor) -> list[torch.Tensor]:
        """What a module saw in the current call, ``x [B, T, I]``, as each original input's real tokens ``[n_i, I]``."""
        rows = self._rows
        if rows is None or x.dim() < 2 or x.shape[0] != sum(rows):
            return [valid_tokens(x, self._mask)]
        masks = [None] * len(rows) if self._mask is None else self._mask.split(rows)
        return [valid_tokens(part, mask) for part, mask in zip(x.split(rows), masks)]

    @torch.no_grad()
    def forward(self, limit: int | None = None) -> list[torch.Tensor]:
        """The module's main output for each input (the first ``limit`` inputs); a full pass runs in batches."""
        outputs = []
        for inp in self.inputs[:limit] if limit is not None else self.batches:
            self._mask, self._rows = inp.mask, inp.rows
            out = first_tensor(self.module(*inp.args, **inp.kwargs))
            outputs.extend(out.split(inp.rows) if inp.rows is not None else [out])
        self._mask, self._rows = None, None
        return outputs

    @contextlib.contextmanager
    def observe(self, modules: Mapping[str, nn.Module], fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
        """While active, ``fn(name, tokens [n, I])`` receives the real tokens entering each module."""

        def make(name: str) -> Callable:
            def deliver(module: nn.Module, x: torch.Tensor) -> None:
                for tokens in self.tokens_of(x.detach()):
                    fn(name, tokens)

            return deliver

        attached = [(m, make(n)) for n, m in modules.items()]
        for module, callback in attached:
            module.observers.append(callback)
        try:
            yield
        finally:
            for module, callback in attached:
                module.observers.remove(callback)

    @torch.no_grad()
    def run_observed(self, modules: Mapping[str, nn.Module], fn: Callable[[str, torch.Tensor], None]) -> None:
        """`observe` over every input, running each only until ``modules`` have all been called.

        The rest of the block cannot change what they see, so it is skipped (a Hessian of q/k/v needs no
        attention or MLP). Without call counts from `input_groups`, or for a module the first input never
        called (data-dependent routing), each input runs in full.
        """
        expected = {id(m): self._calls.get(id(m), 0) for m in modules.values()}
        if not expected or min(expected.values()) == 0:
            with self.observe(modules, fn):
                self.forward()
            return
        seen: dict[int, int] = {}

        def stop_when_all_called(module: nn.Module, x: torch.Tensor) -> None:  # after `observe`'s callback
            seen[id(module)] = seen.get(id(module), 0) + 1
            if len(seen) == len(expected) and all(seen[k] >= n for k, n in expected.items()):
                raise _StopForward

        with self.observe(modules, fn):
            for module in modules.values():
                module.observers.append(stop_when_all_called)
            try:
                for inp in self.batches:
                    seen.clear()
                    self._mask, self._rows = inp.mask, inp.rows
                    try:
                        self.module(*inp.args, **inp.kwargs)
                    except _StopForward:
                        pass
            finally:
                for module in modules.values():
                    module.observers.remove(stop_when_all_called)
        self._mask, self._rows = None, None

    @torch.no_grad()
    def input_groups(self, modules: Mapping[str, nn.Module]) -> list[list[str]]:
        """Modules grouped by the input tensor they share (e.g. q/k/v), groups in call order."""
        seen: list[tuple[str, torch.Tensor]] = []  # keeps inputs alive so no address is reused mid-pass

        def record(name: str) -> Callable:
            return lambda module, x: seen.append((name, x))

        attached = [(m, record(n)) for n, m in modules.items()]
        for module, callback in attached:
            module.observers.append(callback)
        try:
            self.forward(limit=1)
        finally:
            for module, callback in attached:
                module.observers.remove(callback)
        groups: list[tuple[torch.Tensor, list[str]]] = []
        for name, x in seen:
            if any(name in members for _, members in groups):
                continue  # a module called twice keeps its first group
            for tensor, members in groups:
                if tensor is x or (tensor.data_ptr() == x.data_ptr() and tensor.shape == x.shape):
                    members.append(name)
                    break
            else:
                groups.append((x, [name]))
        for name, module in modules.items():
            self._calls[id(module)] = sum(1 for n, _ in seen if n == name)
        called = {n for _, members in groups for n in members}
        return [members for _, members in groups] + [[n] for n in modules if n not in called]


def find_blocks(model: nn.Module, target_names: Iterable[str]) -> tuple[str, nn.ModuleList] | None:
    """The ModuleList of identical block classes that holds the most target Linears."""
    targets = list(target_names)
    best, best_count = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        count = sum(1 for t in targets if t.startswith(f"{name}."))
        if count > best_count:
            best, best_count = (name, module), count
    return best


def _drop_caches(kwargs: dict) -> dict:
    """Blocks are re-run many times: a KV cache would grow with each run, so calibration runs without one."""
    from qapframe.transformers_internals import cache_class

    Cache = cache_class()
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, Cache) or key in ("past_key_values", "past_key_value", "cache"):
            value = None
        elif key == "use_cache":
            value = False
        out[key] = value
    return out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: nn.Module, samples: list[dict],
                         parent: nn.Module | None = None) -> list[BlockInput]:
    """What each calibration sample passes to ``block`` (the first repeated block), and what ``parent`` (the
    module whose forward runs the blocks) adds between blocks for that sample."""
    from qapframe.transformers_internals import between_layers

    captured: list[BlockInput] = []
    parent_kwargs: list[dict] = [{}]

    def parent_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        parent_kwargs[0] = kwargs

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        between = between_layers(parent, parent_kwargs[0]) if parent is not None else None
        captured.append(BlockInput(tuple(args), _drop_caches(kwargs), between=between))
        raise _StopForward

    handles = [block.register_forward_pre_hook(hook, with_kwargs=True)]
    if parent is not None:
        handles.append(parent.register_forward_pre_hook(parent_hook, with_kwargs=True))
    try:
        for sample in samples:
            before = len(captured)
            try:
                model(**sample)
            except _StopForward:
                pass
            if len(captured) != before + 1:
                raise RuntimeError("the first block was not called by the model's forward")
            captured[-1].mask = token_mask(sample)
            parent_kwargs[0] = {}
    finally:
        for handle in handles:
            handle.remove()
    return captured


Process = Callable[[BlockData, dict[str, nn.Module]], None]


def calibrate_sequential(model: nn.Module, linears: dict[str, nn.Linear], samples: list[dict],
                         wrap: Callable[[nn.Linear], nn.Module], process: Process) -> None:
    """Wrap and ``process`` the target ``linears`` block by block (see the module docstring).

    ``process(data, modules)`` gets the block with its inputs and the wrapped modules of that block,
    keyed by name relative to ``data.module``; it must leave them quantized.
    """
    remaining = dict(linears)
    found = find_blocks(model, linears)
    inputs: list[BlockInput] | None = None
    if found is not None:
        prefix, blocks = found
        try:
            parent = model.get_submodule(prefix.rsplit(".", 1)[0]) if "." in prefix else model
            inputs = capture_block_inputs(model, blocks[0], samples, parent)
        except Exception as exc:  # any architecture surprise: the whole-model path still works
            log.warning("qapframe: block-by-block calibration unavailable (%s: %s); hooking all Linears at once",
                        type(exc).__name__, exc)
    else:
        log.warning("qapframe: no repeated blocks found; calibrating all target Linears in one pass over the model")
    if inputs is not None:
        log.info("qapframe: calibrating %d blocks of %s sequentially", len(blocks), prefix)
        for i, block in enumerate(blocks):
            block_prefix = f"{prefix}.{i}."
            names = [n for n in remaining if n.startswith(block_prefix)]
            data = BlockData(block, inputs)
            modules = {}
            for name in names:
                modules[name[len(block_prefix):]] = wrapped = wrap(remaining.pop(name))
                set_module(model, name, wrapped)
            with holding_weights(modules.values()):
                if modules:
                    process(data, modules)
                if i + 1 < len(blocks):
                    outputs = data.quantized_outputs if data.quantized_outputs is not None else data.forward()
                    inputs = [with_hidden(inp, out, i) for inp, out in zip(inputs, outputs)]
    if remaining:
        modules = {}
        for name, linear in remaining.items():
            modules[name] = wrapped = wrap(linear)
            set_module(model, name, wrapped)
        with holding_weights(modules.values()):
            process(BlockData(model, [BlockInput((), s, token_mask(s)) for s in samples]), modules)


__all__ = [
    "BlockData", "BlockInput", "calibrate_sequential", "capture_block_inputs", "find_blocks", "first_tensor",
    "select_samples", "valid_tokens",
]
