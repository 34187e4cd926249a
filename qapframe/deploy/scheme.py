"""A `QuantizedLinear` in compressed-tensors terms: its scheme (config-group entry) and its checkpoint tensors.

compressed-tensors codes are signed: an asymmetric b-bit code ``q`` (``0 .. 2^b - 1``) and zero point ``z``
become ``q - 2^(b-1)`` and ``z - 2^(b-1)``, leaving ``(q - z) * scale`` unchanged. Below 8 bits the format is
``pack-quantized`` (codes densely packed in int32 words along the input dim, the same words `QuantizedLinear`
keeps at run time; asymmetric zero points packed along dim 0); at 8 bits ``int-quantized`` (int8 ``weight``).
What the format cannot express is refused here, naming the module and the setting that would export.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from qapframe.errors import QapframeError
from qapframe.quant_grid import qparams
from qapframe.quantizers.fake_quant import QuantizedLinear
from qapframe.quantizers.packing import pack_codes, unpack_codes

PACKED = "pack-quantized"
INT8 = "int-quantized"


class ExportError(QapframeError):
    """A model or setting that cannot be written as a compressed-tensors checkpoint (or read back)."""


@dataclass(frozen=True)
class ModuleScheme:
    """The compressed-tensors description of one quantized Linear (hashable: equal schemes share a config group)."""

    format: str
    weights: str  # JSON of the weight QuantizationArgs
    input_activations: str | None  # JSON of the input QuantizationArgs, None when activations stay fp

    def config_group(self, targets: list[str]) -> dict:
        return {
            "targets": targets,
            "weights": json.loads(self.weights),
            "input_activations": None if self.input_activations is None else json.loads(self.input_activations),
            "output_activations": None,
            "format": self.format,
        }


def _refuse(name: str, what: str, instead: str) -> ExportError:
    return ExportError(f"export: module {name!r}: {what}; compressed-tensors cannot express it. Exportable: {instead}")


def module_scheme(name: str, module: QuantizedLinear, act_order: str = "off") -> ModuleScheme:
    """The scheme of ``module`` (named ``name``), or `ExportError` saying what cannot be expressed."""
    if not module.quantized:
        raise _refuse(name, "its weights were never quantized (calibration did not finish)", "quantized modules only")
    if module.smooth is not None:
        raise _refuse(
            name, "it divides its input by SmoothQuant/AWQ scales that no preceding layer absorbed (`smooth`)",
            "smoothing folded into the preceding norm/Linear: set unfused_scales: false (such groups are then "
            "left unscaled) or target layers whose producer can absorb the scales",
        )
    if module.input_transform is not None:
        raise _refuse(
            name, f"it applies an online transform to its input ({type(module.input_transform).__name__}, the "
            "rotation's online Hadamard); compressed-tensors 0.20 transforms are not applied by transformers' loader "
            "and use other Hadamard matrices",
            "rotations folded offline: rotation {name: hadamard, online_down_proj: false}",
        )
    w = module.weight_spec
    in_f = module.in_features
    if act_order == "group":
        raise _refuse(
            name, "GPTQ act_order: group permutes the weight groups (g_idx); compressed-tensors >= 0.20 removed "
            "activation-ordered groups", "act_order: static (the default) or off",
        )
    if not torch.equal(module.g_idx.cpu(), torch.arange(in_f, dtype=torch.int32) // (in_f if w.group_size == -1 else w.group_size)):
        raise _refuse(name, "its groups are permuted (g_idx is not in channel order)", "act_order: static or off")
    channel = w.group_size == -1 or w.group_size >= in_f
    if not channel and in_f % w.group_size:
        raise _refuse(
            name, f"group_size {w.group_size} does not divide its {in_f} input channels",
            f"a group_size dividing {in_f}, or group_size: -1 (per channel)",
        )
    weights = {
        "num_bits": w.bits, "type": "int", "symmetric": w.symmetric,
        "strategy": "channel" if channel else "group", "group_size": None if channel else w.group_size,
        "dynamic": False, "actorder": "static" if act_order == "static" else None,
    }
    act = None
    if module.act_quant is not None and module.act_quant.enabled:
        act = _activation_args(name, module)
    fmt = INT8 if w.bits == 8 else PACKED
    return ModuleScheme(fmt, json.dumps(weights, sort_keys=True), None if act is None else json.dumps(act, sort_keys=True))


def _activation_args(name: str, module: QuantizedLinear) -> dict:
    s = module.act_quant.spec
    if s.symmetric and not s.full_range and s.bits < 8:
        # compressed-tensors' symmetric grid is the full one, amax / (2^(b-1) - 1/2); qapframe's narrow grid is
        # amax / (2^(b-1) - 1): at 8 bits a 0.4% scale difference, at 4 bits 7%, which changes the model.
        raise _refuse(
            name, f"symmetric {s.bits}-bit activations on the narrow grid (compressed-tensors scales them by "
            f"amax/{2 ** (s.bits - 1) - 0.5}, the narrow grid by amax/{2 ** (s.bits - 1) - 1})",
            "act_symmetric_grid: full, act_symmetric: false, or 8-bit activations",
        )
    if s.dynamic:
        if s.group_size == -1:
            strategy, group = "token", None
        elif module.in_features % s.group_size == 0:
            strategy, group = "group", s.group_size
        else:
            raise _refuse(name, f"act_group_size {s.group_size} does not divide {module.in_features}",
                          "an act_group_size dividing the input width, or -1 (per token)")
    else:
        if s.group_size != -1:
            raise _refuse(name, "static activation groups", "static per-tensor (act_group_size: -1) or dynamic")
        strategy, group = "tensor", None
    return {"num_bits": s.bits, "type": "int", "symmetric": s.symmetric, "strategy": strategy,
            "group_size": group, "dynamic": s.dynamic, "actorder": None}


def _signed_zeros(name: str, module: QuantizedLinear) -> torch.Tensor:
    """Asymmetric zero points ``[O, G]`` as compressed-tensors' signed int8 (``z - 2^(b-1)``)."""
    bits = module.weight_spec.bits
    z = module.zeros
    if not torch.equal(z, z.round()) or bool(((z < 0) | (z > 2**bits - 1)).any()):
        raise _refuse(name, f"a weight group's zero point lies outside the {bits}-bit code range (a group whose "
                      "values all have one sign)", "symmetric: true")
    return (z - 2 ** (bits - 1)).to(torch.int8)


def module_tensors(name: str, module: QuantizedLinear, scheme: ModuleScheme) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of ``module`` under ``name`` (``weight_packed``/``weight``, scales, zero points, ...)."""
    w = module.weight_spec
    dtype = module.dtype  # scales in the model's dtype, as compressed-tensors initialises them
    out: dict[str, torch.Tensor] = {}
    scales = module.scales
    if scheme.format == PACKED:
        # `QuantizedLinear` stores q - lo: asymmetric q = (q - 2^(b-1)) + 2^(b-1), symmetric q + 2^(b-1): both
        # are compressed-tensors' signed code + 2^(b-1), the value its pack_to_int32 packs. Same words.
        packed = module.qweight
        out[f"{name}.weight_packed"] = packed.contiguous()
        out[f"{name}.weight_shape"] = torch.tensor([module.out_features, module.in_features], dtype=torch.int64)
        if not w.symmetric:
            zeros = _signed_zeros(name, module)  # [O, G]
            unsigned = zeros.to(torch.int64) + 2 ** (w.bits - 1)
            out[f"{name}.weight_zero_point"] = pack_codes(unsigned.T.contiguous(), w.bits).T.contiguous()
    else:
        codes = module.codes  # [O, I]
        out[f"{name}.weight"] = (codes.to(torch.int16) - (0 if w.symmetric else 128)).to(torch.int8)
        if not w.symmetric:
            out[f"{name}.weight_zero_point"] = _signed_zeros(name, module)
    out[f"{name}.weight_scale"] = scales.to(dtype).contiguous()
    if module.bias is not None:
        out[f"{name}.bias"] = module.bias.detach()
    act = module.act_quant
    if act is not None and scheme.input_activations is not None and not act.spec.dynamic:
        scale, zero = qparams(torch.stack([act.lo, act.hi]).float(), act.spec.bits, act.spec.symmetric,
                              act.spec.full_range)
        out[f"{name}.input_scale"] = scale.reshape(1).to(dtype)
        if not act.spec.symmetric:
            z = zero.reshape(1)
            if bool(((z < 0) | (z > 2**act.spec.bits - 1)).any()):
                raise _refuse(name, "its static activation range does not contain 0", "act_symmetric: true or dynamic")
            out[f"{name}.input_zero_point"] = (z - 2 ** (act.spec.bits - 1)).to(torch.int8)
    return out


def decompress_codes(tensors: dict[str, torch.Tensor], name: str, scheme: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Back from a checkpoint: ``(qapframe codes [O, I] int64, zeros [O, G] float32)`` of module ``name``."""
    w = scheme["weights"]
    bits, symmetric = w["num_bits"], w["symmetric"]
    half = 2 ** (bits - 1)
    if f"{name}.weight_packed" in tensors:
        shape = tensors[f"{name}.weight_shape"].tolist()
        unsigned = unpack_codes(tensors[f"{name}.weight_packed"], bits, shape[1]).to(torch.int64)  # signed + half
        codes = unsigned - half if symmetric else unsigned
        zeros = torch.zeros_like(tensors[f"{name}.weight_scale"], dtype=torch.float32)
        if not symmetric:
            zp = tensors[f"{name}.weight_zero_point"]  # [ceil(O*b/32), G]
            zeros = unpack_codes(zp.T.contiguous(), bits, shape[0]).T.to(torch.float32)  # = signed + half = z
        return codes, zeros
    signed = tensors[f"{name}.weight"].to(torch.int64)
    codes = signed if symmetric else signed + half
    zeros = torch.zeros_like(tensors[f"{name}.weight_scale"], dtype=torch.float32)
    if not symmetric:
        zeros = tensors[f"{name}.weight_zero_point"].to(torch.float32) + half
    return codes, zeros


__all__ = ["ExportError", "INT8", "ModuleScheme", "PACKED", "decompress_codes", "module_scheme", "module_tensors"]
