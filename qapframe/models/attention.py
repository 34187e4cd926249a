"""Attention rows recomputed from hooked projections, so scoring works under `sdpa` (no eager attention).

`sdpa` never materializes attention probabilities and `output_attentions=True` forces the slow eager
path, so the few rows a scorer needs (the vision encoder's [CLS] row, the LLM's last text token row)
are recomputed here from the query/key projections captured by forward hooks. `query_attention` does
the same for any chosen query positions (SparseVLM's text raters), a few rows at a time.
"""

from __future__ import annotations

import torch

from qapframe.transformers_internals import modeling_function


def attention_probs(
    query: torch.Tensor, keys: torch.Tensor, scaling: float, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention ``query [B, H, Q, Dh]`` x ``keys [B, Hkv, S, Dh]`` -> ``[B, H, Q, S]`` float32.

    ``allowed [B, Q, S]`` (bool) masks out padding / future keys; grouped-query keys are shared by
    ``H // Hkv`` consecutive query heads, as in transformers' ``repeat_kv``.
    """
    heads, kv_heads = query.shape[1], keys.shape[1]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key heads ({kv_heads})")
    keys = keys.repeat_interleave(heads // kv_heads, dim=1)
    logits = torch.matmul(query.float(), keys.float().transpose(-1, -2)) * scaling
    if allowed is not None:
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    return logits.softmax(dim=-1)


class ProjectionCapture:
    """Hooks one attention module and keeps its query/key projections (and rotary embeddings).

    Works for the transformers v5 attention modules with ``q_proj``/``k_proj`` (CLIP, LLaMA,
    Mistral, Qwen2/3). Capturing is off unless ``enabled``; ``remove()`` detaches every hook.
    """

    def __init__(self, attention: torch.nn.Module):
        self.attention = attention
        self.enabled = False
        self.q: torch.Tensor | None = None  # [B, S, H * Dh] raw projection
        self.k: torch.Tensor | None = None  # [B, S, Hkv * Dh]
        self.position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
        self._handles = [
            attention.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            attention.q_proj.register_forward_hook(self._q_hook),
            attention.k_proj.register_forward_hook(self._k_hook),
        ]

    def _pre_hook(self, module, args, kwargs):
        if self.enabled:
            self.position_embeddings = kwargs.get("position_embeddings")

    def _q_hook(self, module, args, output):
        if self.enabled:
            self.q = output.detach()

    def _k_hook(self, module, args, output):
        if self.enabled:
            self.k = output.detach()

    @property
    def head_dim(self) -> int:
        return int(self.attention.head_dim)

    @property
    def scaling(self) -> float:
        return float(getattr(self.attention, "scaling", getattr(self.attention, "scale", self.head_dim**-0.5)))

    def query_key(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The captured ``q [B, H, S, Dh]`` and ``k [B, Hkv, S, Dh]`` as the attention kernel sees them."""
        if self.q is None or self.k is None:
            raise RuntimeError("no query/key captured: the hooked attention module did not run while enabled")
        b, s = self.q.shape[:2]
        q = self.q.view(b, s, -1, self.head_dim)
        k = self.k.view(b, s, -1, self.head_dim)
        # Qwen3-style per-head norms come before the rotary embedding.
        if hasattr(self.attention, "q_norm"):
            q, k = self.attention.q_norm(q), self.attention.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if self.position_embeddings is not None:
            cos, sin = self.position_embeddings
            # Use the architecture's own rotary function: conventions (half-rotation, interleaving) differ.
            rotate = modeling_function(self.attention, "apply_rotary_pos_emb")
            q, k = rotate(q, k, cos, sin)
        return q, k

    def clear(self) -> None:
        self.q = self.k = self.position_embeddings = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()


def cls_attention_and_keys(capture: ProjectionCapture) -> tuple[torch.Tensor, torch.Tensor]:
    """From a hooked vision-encoder layer: [CLS] -> token attention, mean over heads ``[B, S]`` (all S
    tokens, CLS included), and the keys averaged over heads ``[B, S, Dh]`` (VisionZip's merge metric)."""
    q, k = capture.query_key()  # [B, H, S, Dh] each; the vision encoder is bidirectional, no mask
    cls_row = attention_probs(q[:, :, :1], k, capture.scaling)[:, :, 0]  # [B, H, S]
    return cls_row.mean(dim=1), k.float().mean(dim=1)


def last_token_attention(capture: ProjectionCapture, attention_mask: torch.Tensor) -> torch.Tensor:
    """From a hooked LLM layer at prefill: the last real token's attention row, mean over heads ``[B, S]``.

    ``attention_mask [B, S]`` (1 = real token); the row is causal, so only keys up to the last real
    token (and not padding) take part in the softmax.
    """
    q, k = capture.query_key()  # [B, H, S, Dh], [B, Hkv, S, Dh]
    mask = attention_mask.bool()
    s = mask.shape[1]
    positions = torch.arange(s, device=mask.device)
    last = torch.where(mask, positions, -1).amax(dim=1)  # [B] index of the last real token
    q_last = q[torch.arange(q.shape[0], device=q.device), :, last].unsqueeze(2)  # [B, H, 1, Dh]
    allowed = (mask & (positions[None] <= last[:, None])).unsqueeze(1)  # [B, 1, S]
    return attention_probs(q_last, k, capture.scaling, allowed)[:, :, 0].mean(dim=1)  # [B, S]


def query_attention(
    capture: ProjectionCapture, attention_mask: torch.Tensor, queries: torch.Tensor, chunk: int = 64
) -> torch.Tensor:
    """From a hooked LLM layer at prefill: the causal attention rows of the tokens at ``queries [B, Q]``
    (positions in the sequence; -1 = no query, its row is 0), mean over heads ``[B, Q, S]`` float32.

    As in `last_token_attention`, only real keys (``attention_mask [B, S]``) up to each query take part;
    queries run ``chunk`` at a time, so memory is ``B * H * chunk * S`` floats.
    """
    q, k = capture.query_key()  # [B, H, S, Dh], [B, Hkv, S, Dh]
    mask = attention_mask.bool()
    b, s = mask.shape
    positions = torch.arange(s, device=mask.device)
    rows = torch.arange(b, device=q.device)[:, None]
    out = []
    for start in range(0, queries.shape[1], chunk):
        part = queries[:, start : start + chunk].to(q.device)  # [B, c]
        present = part >= 0
        safe = part.clamp_min(0)
        q_part = q[rows, :, safe].transpose(1, 2)  # [B, c, H, Dh] -> [B, H, c, Dh]
        allowed = mask[:, None, :] & (positions[None, None, :] <= safe[..., None])  # [B, c, S]
        allowed = allowed | ~present[..., None]  # an absent query gets a harmless full row, zeroed below
        probs = attention_probs(q_part, k, capture.scaling, allowed).mean(dim=1)  # [B, c, S]
        out.append(probs * present[..., None])
    if not out:
        return torch.zeros(b, 0, s, dtype=torch.float32, device=q.device)
    return torch.cat(out, dim=1)


def received_attention_and_keys(capture: ProjectionCapture) -> tuple[torch.Tensor, torch.Tensor]:
    """From a hooked vision-encoder layer without [CLS] (SigLIP): the mean attention each token receives,
    averaged over heads and over all queries of its crop ``[B, S]``, and the keys averaged over heads
    ``[B, S, Dh]``. Each crop's row sums to 1, like a [CLS] row; computed one crop at a time, since the
    full ``[H, S, S]`` probabilities of every crop at once would cost ``B * H * S^2`` floats."""
    q, k = capture.query_key()  # [B, H, S, Dh] each; bidirectional, no mask
    received = torch.stack([attention_probs(q[i : i + 1], k[i : i + 1], capture.scaling).mean(dim=(1, 2))[0]
                            for i in range(q.shape[0])])  # [B, S]
    return received, k.float().mean(dim=1)


def packed_received_attention(
    query: torch.Tensor, keys: torch.Tensor, scaling: float, cu_seqlens: torch.Tensor, chunk: int = 256,
    max_queries: int | None = None,
) -> torch.Tensor:
    """Bidirectional attention within each packed segment (``cu_seqlens [G + 1]``, e.g. Qwen's frames) of
    ``query``/``keys [S, H, Dh]`` -> ``[S]`` float32: the attention each token receives, mean over heads and
    over its segment's queries (each segment sums to 1). Queries run in chunks, so memory is
    ``H * chunk * S_g`` floats, not ``H * S_g^2``.

    The probabilities are never formed: with ``e = exp(l - max_k l)`` per query row and ``z`` its row sum,
    what key ``k`` receives is ``sum_q e_qk / z_q``, one matrix-vector product per head (the same sum as
    ``softmax(l).sum(q)``, in another order). It costs O(S_g^2) per segment when all of its queries count;
    ``max_queries`` caps them at an evenly strided subset (every ``ceil(S_g / max_queries)``-th query), an
    estimate of the same mean at ``O(max_queries * S_g)``."""
    out = torch.empty(query.shape[0], dtype=torch.float32, device=query.device)
    bounds = cu_seqlens.tolist()
    heads, kv_heads = query.shape[1], keys.shape[1]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key heads ({kv_heads})")
    for start, end in zip(bounds[:-1], bounds[1:]):
        k = keys[start:end].float().transpose(0, 1).repeat_interleave(heads // kv_heads, dim=0)  # [H, S_g, Dh]
        total = torch.zeros(end - start, dtype=torch.float32, device=query.device)
        stride = 1 if max_queries is None else max(1, -(-(end - start) // max_queries))
        queries = query[start:end:stride]  # [S_q, H, Dh]
        for q0 in range(0, queries.shape[0], chunk):
            q = queries[q0 : q0 + chunk].float().transpose(0, 1) * scaling  # [H, c, Dh]
            logits = torch.bmm(q, k.transpose(1, 2))  # [H, c, S_g]
            logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
            inverse = logits.sum(dim=-1, keepdim=True).reciprocal_()  # [H, c, 1] = 1 / z_q
            total += torch.bmm(inverse.transpose(1, 2), logits).sum(dim=(0, 1))  # sum_h sum_q e_qk / z_q
        out[start:end] = total / (heads * queries.shape[0])
    return out
