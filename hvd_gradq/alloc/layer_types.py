"""Layer types (QODA's grouping): which kind of module a parameter belongs to. Pure torch.

Types: "embedding", "attention", "conv", "norm", "bias", "linear" (FFN and other dense layers),
"rnn", "other". The allocator can decide one bit width per type instead of per layer
(``Allocator(group="type")``); ``layer_types`` is also what a per-type level set would key on.
"""
from __future__ import annotations

import torch

_NORMS = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._NormBase)
_RNNS = (torch.nn.RNNBase,)


def module_type(module: torch.nn.Module, param_name: str) -> str:
    """The type of parameter ``param_name`` (its name inside ``module``)."""
    if param_name.endswith("bias") and not isinstance(module, torch.nn.MultiheadAttention):
        return "bias"
    if isinstance(module, torch.nn.Embedding | torch.nn.EmbeddingBag):
        return "embedding"
    if isinstance(module, torch.nn.MultiheadAttention):
        return "attention"
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, _NORMS):
        return "norm"
    if isinstance(module, _RNNS):
        return "rnn"
    if isinstance(module, torch.nn.Linear):
        return "linear"
    return "other"


def layer_types(model: torch.nn.Module, params: dict[str, torch.Tensor] | None = None) -> dict[str, str]:
    """Type of every parameter of ``model`` (keys: the names in ``params`` if given, matched by
    identity, else the model's own parameter names). Linear layers whose module path mentions
    attention ("attn", "attention", "q_proj", ...) count as "attention"."""
    owner: dict[int, str] = {}
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            kind = module_type(mod, p_name)
            path = mod_name.lower()
            if kind == "linear" and any(k in path for k in ("attn", "attention", "q_proj", "k_proj", "v_proj")):
                kind = "attention"
            owner.setdefault(id(p), kind)
    if params is None:
        return {n: owner.get(id(p), "other") for n, p in model.named_parameters()}
    return {n: owner.get(id(p), "other") for n, p in params.items()}
