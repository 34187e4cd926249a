"""ToMe: merge the most similar vision tokens by bipartite soft matching until the budget is left.

Bolya et al., "Token Merging: Your ViT But Faster" (ICLR 2023). One round, on the image's current tokens in
order: the even ones (set A) each draw an edge to their most cosine-similar odd one (set B), the
``r = min(T - budget, T // 2)`` strongest edges are merged (several A tokens may join one B token), every
other token survives unchanged. Rounds repeat (64 -> 32 -> 16 -> 8 at 12.5 %) until ``budget`` tokens are left.

Here ToMe runs once, on the vision tower's output, instead of between its layers (which would need a
retrofit of every vision encoder and a budget split over layers). What follows from that:

- The metric is ToMe's: the vision encoder's keys averaged over heads, at the layer that produced the
  features (`metric: keys`; `embeds` uses the projected tokens, for adapters without keys). A merged token's
  key for the next round is the mean of its members' keys, what ToMe's next layer would compute from the
  averaged token if the key projection's LayerNorm were left out.
- The LLM receives each group's mean projected embedding (ToMe's size-weighted average over rounds is
  exactly that), at the position of the group's surviving B token: ``Selection.kept_weights`` holds the
  means, so per-token data that an adapter passes along (Qwen3-VL's deepstack features) is merged the
  same way. ToMe's proportional attention (log group size added to attention logits) is not applied:
  the LLM's attention is left unmodified, as LightCompress does for VLMs.
- Scores are not used (ToMe is score-free); pair it with any scorer, e.g. `l2norm`.
- Ties break toward the earlier token: a's best match is its first most similar b, and equal edges merge
  the earlier a first.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from qapframe.strategies.base import PRUNERS, Pruner, PrunerConfig, Selection
from qapframe.strategies.context import Requirements, ScoringContext
from qapframe.strategies.pruners.selection import unit_rows


class ToMeConfig(PrunerConfig):
    metric: Literal["keys", "embeds"] = Field(
        "keys",
        description="what similarity is measured on: the vision encoder's keys (ToMe's metric) or the projected tokens",
    )


def bipartite_merge(metric: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeated bipartite soft matching: ``metric [B, N, Dk]`` -> ``(keep [B, budget], group [B, N])``.

    ``keep`` are the surviving tokens, ascending; ``group[b, n]`` is the index into ``keep`` of the
    group token ``n`` was merged into (a survivor is in its own group). Computed in float32 or wider.
    """
    b, n, _ = metric.shape
    device = metric.device
    rows = torch.arange(b, device=device)[:, None]
    total = metric.to(torch.promote_types(metric.dtype, torch.float32))  # [B, T, Dk] sum of members' keys
    size = torch.ones(b, n, dtype=total.dtype, device=device)  # [B, T] members per current token
    survivor = torch.arange(n, device=device).expand(b, n)  # [B, T] each current token's original index
    slot = survivor.clone()  # [B, N] each original token's current token
    t = n
    while t > budget:
        r = min(t - budget, t // 2)
        unit = unit_rows(total / size[..., None])  # the members' mean key, normalised (cosine similarity)
        similarity = unit[:, 0::2] @ unit[:, 1::2].transpose(1, 2)  # [B, |A|, |B|]
        best, match = similarity.max(dim=-1)  # max returns the first index of a tie
        order = torch.sort(best, dim=-1, descending=True, stable=True).indices  # strongest edges first
        merged_a = order[:, :r]  # [B, r] indices into A
        source = 2 * merged_a  # [B, r] current indices of the merged A tokens (A: even, B: odd)
        target = 1 + 2 * match.gather(1, merged_a)  # [B, r] current indices of the B tokens they join
        total = total.index_put((rows.expand_as(target), target), total[rows, source], accumulate=True)
        size = size.index_put((rows.expand_as(target), target), size[rows, source], accumulate=True)
        # Each current token's token after the round: a merged A token goes where its B token goes.
        goes_to = torch.arange(t, device=device).expand(b, t).clone()
        goes_to[rows, source] = target
        alive = torch.ones(b, t, dtype=torch.bool, device=device)
        alive[rows, source] = False
        new_index = alive.long().cumsum(dim=-1) - 1  # [B, T] position among the survivors (order is kept)
        slot = new_index.gather(1, goes_to).gather(1, slot)
        t -= r
        total = total[alive].view(b, t, -1)
        size = size[alive].view(b, t)
        survivor = survivor[alive].view(b, t)
    return survivor, slot


def group_means(group: torch.Tensor, num_groups: int, dtype: torch.dtype) -> torch.Tensor:
    """``group [B, N]`` (each token's group) -> the weights ``[B, num_groups, N]`` of each group's mean."""
    onehot = torch.nn.functional.one_hot(group, num_groups).transpose(1, 2).to(dtype)  # [B, G, N]
    return onehot / onehot.sum(dim=-1, keepdim=True)


@PRUNERS.register("tome")
class ToMePruner(Pruner):
    """Bipartite soft matching of the most similar tokens, merged into group means, budget(N) in total."""

    Config = ToMeConfig
    config: ToMeConfig
    pre_llm_only: ClassVar[bool] = True  # its groups are means of projected tokens, which the in-LLM path does not take

    def requirements(self) -> Requirements:
        return Requirements(vision_keys=self.config.metric == "keys")

    def select(self, scores: torch.Tensor, context: ScoringContext) -> Selection:
        n = scores.shape[-1]
        k = self.budget(n)
        if k >= n:
            return Selection(keep_index=torch.arange(n, device=scores.device).expand(scores.shape[0], n).clone())
        metric = context.require("vision_keys", "tome pruner") if self.config.metric == "keys" else context.vision_embeds
        keep, group = bipartite_merge(metric, k)
        weights = group_means(group, k, torch.promote_types(context.vision_embeds.dtype, torch.float32))
        return Selection(keep_index=keep, kept_weights=weights)
