"""Stage 0c of the toy's training: the LLM first learns the questions on ideal nine-token scenes.

Why: handed one clean token per grid cell, the toy's LLM (twelve heads, weights at 1/sqrt(width), a loss on
the question text) reaches 90 % in 1000 steps; handed the same content as 64 patch tokens it is at 65 % after
as many (docs/toy.md, `research/toy/llm_symbolic.py`). So the LLM learns to search and count where that is fast,
on scenes whose tokens are exactly stage 0b's codes (the sum of the fixed codes of a cell's place, colour and
shape, `research.toy.projector_pretrain`), and stage 1 then moves it to the real 64 tokens, which stage 0b
has already laid out in the same codes. The vision tower and projector are not touched here.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from types import SimpleNamespace

import torch

from qapframe.data.synthetic import make_record
from research.toy.optim import lr_at, toy_adamw
from research.toy.projector_pretrain import symbolic_codes, target_tokens

# Stage-0c records come from their own index range of the train split, apart from the other stages and the probes.
RECORD_OFFSET = 40_000_000
NINE_CELLS = torch.arange(9)  # one token a grid cell, in the order of the image's patches (row-major)


def code_scenes(records, codes: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, 9, W]``: each record's scene as nine ideal tokens, one a grid cell, in stage 0b's codes."""
    return target_tokens(records, NINE_CELLS, codes)


@torch.enable_grad()  # training, whatever grad mode the caller left on
def pretrain_llm(model, steps: int, batch_size: int, lr: float, warmup: int, weight_decay: float, data_seed: int,
                 seed: int, loss_fn: Callable[[list, torch.Tensor], torch.Tensor],
                 log_every: int = 50) -> dict[str, float]:
    """Train ``model``'s LLM (word embeddings, decoder, LM head) in place on nine-token code scenes.

    ``loss_fn(records, scene_tokens)`` is stage 1's loss on given image tokens; optimiser and schedule are
    stage 1's too (`research.toy.optim`). Tower and projector stay as they are. Returns the last logged loss and
    the time taken.
    """
    codes = symbolic_codes(model.config.text_config.hidden_size, seed)  # the very codes stage 0b fitted
    params = [*model.model.language_model.parameters(), *model.lm_head.parameters()]
    optimizer = toy_adamw(params, lr, weight_decay)
    schedule = SimpleNamespace(lr=lr, warmup=warmup, steps=steps)
    records = (make_record(data_seed, "train", RECORD_OFFSET + i) for i in itertools.count())
    start, running = time.time(), None
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, schedule)
        batch = list(itertools.islice(records, batch_size))
        loss = loss_fn(batch, code_scenes(batch, codes))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"llm step {step + 1:5d}  loss {running:.4f}  {time.time() - start:6.0f}s", flush=True)
    return {"llm_pretrain_loss": round(running, 4), "llm_pretrain_seconds": round(time.time() - start, 1)}


__all__ = ["NINE_CELLS", "RECORD_OFFSET", "code_scenes", "pretrain_llm"]
