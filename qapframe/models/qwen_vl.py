"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL adapters: the vision tokens are the patch merger's outputs.

A vision token is one merged token (a ``merge x merge`` block of patches): an image or video with grid
``(t, h, w)`` patches (``image_grid_thw`` / ``video_grid_thw``) has ``t * h * w / merge^2`` of them, the
per-item ``pooler_output`` of ``get_image_features`` / ``get_video_features``. A video is one token set:
its frames are scored and pruned together (one budget per clip).

Positions (M-RoPE): the model gives every token a (t, h, w) position (``get_rope_index``; text advances all
three). Pre-LLM pruning feeds the shortened prompt as ``input_ids`` with placeholders for the kept tokens
only, the kept features as ``mm_encoder_outputs``, and the *unpruned* prompt's positions gathered at the
kept tokens as explicit ``position_ids`` (``[3, B, L']`` to forward; ``[4, B, L']`` with the text row to
generate, as the models' own generate builds them). Text after an image keeps its positions, merged tokens
(VisionZip) take their image's last placeholder position, and ``model.model.rope_deltas`` is set the way
the model's own forward sets it, so cached decoding continues from the unpruned prompt's last position:
the pruned model sees exactly what the unpruned one would at those tokens. As in the model, 3-D
positions need ``mm_token_type_ids`` (the processor returns them); without, both use 1-D positions.
In-LLM pruning (FastV, DART, PyramidDrop) needs nothing more: kept tokens keep their rotary embeddings.

[CLS] stand-in: Qwen's vision tower has no [CLS]. ``ImageTokens.cls_attention`` is the mean attention each
merged token receives in the tower's last full-attention block (Qwen2.5-VL: ``fullatt_block_indexes[-1]``,
the others window; Qwen2-VL and Qwen3-VL: every block is full, so the last), mean over heads and over the
queries of its frame (no attention crosses frames or images: ``cu_seqlens``; beyond `stand_in_queries`
patches per frame, an evenly strided subset of the queries, so that the stand-in costs O(S) rather than
O(S^2)), then averaged over the ``merge^2`` patches it merges. It is recomputed from that block's fused ``qkv`` output and rotary
embeddings, so it works under sdpa. ``ImageTokens.keys`` is the mean key of those patches (mean over heads,
before the rotary embedding, so that it compares content as VisionZip's merge does).

Qwen3-VL's deepstack features (added at the visual positions after the first LLM layers) follow the kept
tokens; merged tokens get none. In-LLM pruning must rank after the deepstack layers (refused otherwise).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from qapframe.models.attention import packed_received_attention
from qapframe.models.base import ADAPTERS
from qapframe.models.installation import HookingAdapter
from qapframe.models.pruning import ImageTokens, image_spans, stack_padded, uses_right_padding
from qapframe.transformers_internals import modeling_function

_TOKEN_TYPE = {"image": 1, "video": 2}  # mm_token_type_ids values


class FusedQKVCapture:
    """Hooks one Qwen vision attention module; per call keeps the received attention ``[S]`` and the
    pre-rotary keys averaged over heads ``[S, Dh]``, in the block's token order."""

    def __init__(self, attention: torch.nn.Module, max_queries: int | None = None):
        self.attention = attention
        self.max_queries = max_queries  # see `QwenVLAdapter.stand_in_queries`
        self.enabled = False
        self.result: tuple[torch.Tensor, torch.Tensor] | None = None
        self._qkv: torch.Tensor | None = None
        self._handles = [
            attention.qkv.register_forward_hook(self._qkv_hook),
            attention.register_forward_hook(self._attention_hook, with_kwargs=True),
        ]

    def _qkv_hook(self, module, args, output):
        if self.enabled:
            self._qkv = output.detach()

    @torch.no_grad()
    def _attention_hook(self, module, args, kwargs, output):
        if not self.enabled or self._qkv is None:
            return
        cu_seqlens = kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1]
        cos, sin = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[2]
        s = self._qkv.shape[0]
        heads = module.num_heads
        q, k, _ = self._qkv.reshape(s, 3, heads, -1).unbind(1)  # [S, H, Dh] each
        rotate = modeling_function(module, "apply_rotary_pos_emb_vision")
        q_rot, k_rot = rotate(q, k, cos, sin)
        received = packed_received_attention(q_rot, k_rot, float(module.scaling), cu_seqlens,
                                             max_queries=self.max_queries)
        self.result = (received, k.float().mean(dim=1))
        self._qkv = None

    def clear(self) -> None:
        self.result = self._qkv = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()


class QwenVLAdapter(HookingAdapter):
    """Shared by the Qwen-VL generations; a subclass names its model class and scoring block."""

    model_class: ClassVar[str] = ""  # the transformers class this adapter handles
    # Queries per frame that the [CLS] stand-in averages over: an evenly strided subset once a frame has more
    # patches (an estimate of the full mean, O(queries x patches) instead of O(patches^2)); None = all.
    stand_in_queries: ClassVar[int | None] = 512
    feature_methods = ("get_image_features", "get_video_features")
    pixel_keys = ("pixel_values", "pixel_values_videos")
    vision_keys = (
        "pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "second_per_grid_ts",
        "mm_token_type_ids", "position_ids",
    )

    @classmethod
    def matches(cls, model: torch.nn.Module) -> bool:
        import transformers  # lazily, as in `LlavaAdapter.matches`

        klass = getattr(transformers, cls.model_class, None) if cls.model_class else None
        return klass is not None and isinstance(model, klass)

    # -- vision side ------------------------------------------------------------------------------
    def feature_block(self, model) -> int:
        """The vision block whose attention scores the tokens: the last full-attention one."""
        return len(model.model.visual.blocks) - 1

    def feature_attention(self, model) -> torch.nn.Module:
        return model.model.visual.blocks[self.feature_block(model)].attn

    def vision_capture(self, model):
        return FusedQKVCapture(self.feature_attention(model), self.stand_in_queries)

    def block_order(self, model, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """Merged-token order inside the vision blocks (``[N]`` indices), None when it is the output order."""
        return None

    def _merged(self, model, values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Per-patch ``values [S, *]`` in block order -> per item ``[N_i, *]`` merged tokens in output order."""
        merge = model.model.visual.spatial_merge_size
        unit = merge * merge
        merged = values.reshape(values.shape[0] // unit, unit, *values.shape[1:]).mean(dim=1)
        order = self.block_order(model, grid_thw)
        if order is not None:
            merged = merged[torch.argsort(order.to(merged.device))]
        return list(torch.split(merged, (grid_thw.prod(-1) // unit).tolist()))

    def describe_features(self, model, output, capture, bound: dict, method: str) -> list[ImageTokens]:
        """Per image or video: merged ``features [N, D]`` (+ received attention ``[N]``, keys ``[N, Dh]``)."""
        modality = "video" if "video" in method else "image"
        grid = bound.get(f"{modality}_grid_thw")
        features = output.pooler_output
        n = len(features)
        cls = keys = [None] * n
        if capture is not None and capture.result is not None:
            received, k = capture.result
            cls, keys = self._merged(model, received, grid), self._merged(model, k, grid)
        deepstack = getattr(output, "deepstack_features", None)
        merge = model.model.visual.spatial_merge_size
        out = []
        for i, f in enumerate(features):
            extra = None if not deepstack else {"deepstack": torch.stack([layer[i] for layer in deepstack])}
            prunable = torch.ones(f.shape[0], dtype=torch.bool, device=f.device)
            t, h, w = (int(v) for v in grid[i])
            layout = (t, h // merge, w // merge)  # temporal patches, then merged rows and columns
            out.append(ImageTokens(f, prunable, cls[i], keys[i], modality=modality, per_token=extra, grid=layout))
        return out

    def encode_images(self, model, vision_inputs: dict) -> None:
        base = model.model
        if vision_inputs.get("pixel_values") is not None:
            base.get_image_features(
                pixel_values=vision_inputs["pixel_values"], image_grid_thw=vision_inputs.get("image_grid_thw")
            )
        if vision_inputs.get("pixel_values_videos") is not None:
            base.get_video_features(
                pixel_values_videos=vision_inputs["pixel_values_videos"], video_grid_thw=vision_inputs.get("video_grid_thw")
            )

    # -- the prompt -----------------------------------------------------------------------------------
    @staticmethod
    def vision_mask(model, input_ids: torch.Tensor) -> torch.Tensor:
        return (input_ids == model.config.image_token_id) | (input_ids == model.config.video_token_id)

    @staticmethod
    def order_images(model, images: list[ImageTokens], prompt) -> list[ImageTokens]:
        """Images and videos interleaved as their placeholder runs appear (row-major), as the model fills them."""
        if prompt is None or len({im.modality for im in images}) < 2:
            return list(images)
        input_ids = prompt[0]
        start: dict[int, tuple[int, int]] = {}
        for modality in _TOKEN_TYPE:
            members = [i for i, im in enumerate(images) if im.modality == modality]
            token = getattr(model.config, f"{modality}_token_id")
            spans = image_spans(input_ids == token, [images[i].num_tokens for i in members])
            for i, (row, positions) in zip(members, spans):
                start[i] = (row, int(positions[0]) if positions.numel() else 0)
        return [images[i] for i in sorted(range(len(images)), key=start.__getitem__)]

    def full_positions(self, model, input_ids, attention_mask, vision_inputs: dict, generate: bool) -> torch.Tensor:
        """``[3, B, L]`` positions the unmodified model gives the prompt: the given ones; ``get_rope_index`` when
        ``mm_token_type_ids`` are given; else (as the model does) 1-D ones, 0..L-1 in forward, from the mask in generate."""
        given = vision_inputs.get("position_ids")
        if given is not None:
            return given[-3:] if given.dim() == 3 else given[None].expand(3, -1, -1)
        types = vision_inputs.get("mm_token_type_ids")
        if types is None:
            b, length = input_ids.shape
            if generate and attention_mask is not None:
                text = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
            else:
                text = torch.arange(length, device=input_ids.device).expand(b, length)
            return text[None].expand(3, -1, -1)
        extra = {k: vision_inputs[k] for k in ("second_per_grid_ts",) if vision_inputs.get(k) is not None}
        positions, _ = model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=types,
            image_grid_thw=vision_inputs.get("image_grid_thw"),
            video_grid_thw=vision_inputs.get("video_grid_thw"),
            attention_mask=attention_mask,
            **extra,
        )
        return positions

    def encoder_output(self, features: list[torch.Tensor], deepstack: list[torch.Tensor] | None):
        """A pre-encoded output (``mm_encoder_outputs`` entry) holding per item ``features [K_i, D]``."""
        from qapframe.transformers_internals import pooled_encoder_output

        return pooled_encoder_output(tuple(features))

    def pruned_inputs(self, model, input_ids, attention_mask, vision_inputs, images, spans, selections, generate=False):
        """The shortened prompt: ``input_ids``/``attention_mask [B, L']``, kept features as
        ``mm_encoder_outputs``, the unpruned positions at the kept tokens ``position_ids [3, B, L']``."""
        positions = self.full_positions(model, input_ids, attention_mask, vision_inputs, generate)  # [3, B, L]
        b = input_ids.shape[0]
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        real = mask.bool()
        per_row: list[list] = [[] for _ in range(b)]
        for (row, pos), sel in zip(spans, selections):
            per_row[row].append((pos, sel))
        sources = []  # per row: the unpruned position each token of the shortened row comes from
        for r in range(b):
            kept = real[r].clone()
            merged = []  # merged tokens right after their item's last placeholder (which they take the position of)
            for pos, sel in per_row[r]:
                dropped = torch.ones(pos.numel(), dtype=torch.bool, device=pos.device)
                dropped[sel.keep_index.to(pos.device)] = False
                kept[pos[dropped]] = False
                if sel.extra_tokens is not None:
                    merged.append(pos[-1:].expand(sel.extra_tokens.shape[0]))
            src = torch.cat([kept.nonzero().squeeze(-1), *merged])
            # Sort keys: a token's own position; merged tokens half a step after their item's last placeholder,
            # so that an item whose placeholders are interleaved with text (Qwen3-VL's frame timestamps) works too.
            keys = src.double() + (torch.arange(src.numel(), device=src.device) >= int(kept.sum())) * 0.5
            sources.append(src[torch.sort(keys, stable=True).indices])
        src, new_mask = stack_padded(sources, -1, uses_right_padding(attention_mask))  # [B, L'] each
        new_mask = new_mask.to(mask.dtype)
        safe = src.clamp_min(0)
        pad_id = getattr(model.config.get_text_config(), "pad_token_id", None) or 0
        ids = torch.where(src >= 0, input_ids.gather(1, safe), torch.full_like(safe, pad_id))
        kept_positions = positions.gather(2, safe[None].expand(3, -1, -1)).masked_fill(src[None] < 0, 0)
        # Decoding continues from the unpruned prompt's last position (the model's own forward sets this too).
        last = positions.masked_fill(~real[None], torch.iinfo(positions.dtype).min).amax(dim=(0, 2))  # [B]
        model.model.rope_deltas = (last + 1 - new_mask.sum(-1)).unsqueeze(1)
        features: dict[str, list] = {"image": [], "video": []}
        deepstack: dict[str, list] = {"image": [], "video": []}
        for im, sel in zip(images, selections):
            features[im.modality].append(sel.tokens(im.features))
            if im.per_token is not None and "deepstack" in im.per_token:
                ds = sel.kept(im.per_token["deepstack"])  # [n_ds, K, D]
                if sel.extra_tokens is not None:
                    ds = torch.cat([ds, ds.new_zeros(ds.shape[0], sel.extra_tokens.shape[0], ds.shape[2])], dim=1)
                deepstack[im.modality].append(ds)
        encoded = {
            modality: self.encoder_output(features[modality], deepstack[modality] or None)
            for modality in _TOKEN_TYPE
            if features[modality]
        }
        return {"input_ids": ids, "attention_mask": new_mask, "position_ids": kept_positions, "mm_encoder_outputs": encoded}

    @staticmethod
    def generate_kwargs(model, pruned: dict) -> dict:
        """Generate takes ``[4, B, L']`` positions: the text row (mask cumsum) above the M-RoPE rows."""
        mask = pruned["attention_mask"]
        text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        return {**pruned, "position_ids": torch.cat([text[None], pruned["position_ids"]], dim=0)}


@ADAPTERS.register("qwen2_vl")
class Qwen2VLAdapter(QwenVLAdapter):
    """Qwen2-VL: every vision block attends over the whole frame."""

    model_class = "Qwen2VLForConditionalGeneration"


@ADAPTERS.register("qwen2_5_vl")
class Qwen25VLAdapter(QwenVLAdapter):
    """Qwen2.5-VL: windowed vision blocks except ``fullatt_block_indexes``; tokens are window-permuted inside."""

    model_class = "Qwen2_5_VLForConditionalGeneration"

    def feature_block(self, model) -> int:
        return max(model.model.visual.fullatt_block_indexes)

    def block_order(self, model, grid_thw: torch.Tensor) -> torch.Tensor:
        from qapframe.transformers_internals import vision_window_index

        visual = model.model.visual
        window_index, _ = vision_window_index(
            grid_thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
            patch_size=visual.patch_size,
        )
        return window_index


@ADAPTERS.register("qwen3_vl")
class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL: full-attention vision blocks; deepstack features follow the kept tokens."""

    model_class = "Qwen3VLForConditionalGeneration"

    def ranking_layers(self, model, requirements) -> list[int]:
        """As for every LLM, but after the deepstack layers: those add features at the *unpruned* visual positions."""
        layers = super().ranking_layers(model, requirements)
        deepstack = len(model.config.vision_config.deepstack_visual_indexes)
        if min(layers) < deepstack:
            raise ValueError(
                f"in-LLM pruning ranks at layers {layers}, but this Qwen3-VL adds deepstack features after its "
                f"first {deepstack} LLM layers; rank at layer {deepstack} or later (FastV/DART: k >= {deepstack + 1})"
            )
        return layers

    def encoder_output(self, features, deepstack):
        from qapframe.transformers_internals import deepstack_encoder_output

        layers = [] if deepstack is None else [tuple(d[layer] for d in deepstack) for layer in range(deepstack[0].shape[0])]
        return deepstack_encoder_output(tuple(features), layers)
