"""Horovod's arguments, checked as Horovod checks them: the named parameters of an optimizer or a
compressor, and ``groups=``."""
from __future__ import annotations

import torch


def optimizer_named_parameters(optimizer: torch.optim.Optimizer, named_parameters) -> list[tuple[str, torch.Tensor]]:
    """The optimizer's parameters with their names (Horovod's ``allreduce.noname.<group>.<index>``
    when none are given), checked as Horovod checks them."""
    if named_parameters is None:
        named = [(f"allreduce.noname.{i}.{j}", p) for i, g in enumerate(optimizer.param_groups)
                 for j, p in enumerate(g["params"])]
    else:
        named = list(named_parameters)
    if not all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in named):
        raise ValueError("named_parameters must be (name, parameter) pairs, e.g. model.named_parameters()")
    names = [n for n, _ in named]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ValueError(f"parameter names in named_parameters must be unique; duplicates: {dups}")
    named_ids = {id(p) for _, p in named}
    unnamed = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in named_ids]
    if unnamed:
        raise ValueError(f"{len(unnamed)} optimizer parameters are missing from named_parameters; pass "
                         "model.named_parameters() of the model the optimizer was built on")
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    return [(n, p) for n, p in named if id(p) in in_optimizer]


def named_list(named_parameters, what: str) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs from ``named_parameters()`` or bare tensors (``parameters()``: named
    by position), with unique names."""
    if named_parameters is None:
        raise ValueError(f"{what}: pass named_parameters=model.named_parameters() (or model.parameters())")
    params = list(named_parameters)
    if params and all(isinstance(p, torch.Tensor) for p in params):
        params = [(f"allreduce.noname.{i}", p) for i, p in enumerate(params)]
    if not params or not all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str)
                             and isinstance(p[1], torch.Tensor) for p in params):
        raise ValueError(f"{what}: named_parameters must be a non-empty iterable of (name, tensor) pairs, e.g. "
                         "model.named_parameters(), or of tensors (model.parameters())")
    names = [n for n, _ in params]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ValueError(f"{what}: parameter names in named_parameters must be unique; duplicates: {dups}")
    return params


def parameter_groups(groups, params: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]] | None:
    if groups is None or groups == 0:
        return None
    if isinstance(groups, bool) or not (isinstance(groups, list) or (isinstance(groups, int) and groups > 0)):
        raise ValueError("groups must be a positive integer or a list of lists of parameters (torch.Tensor)")
    ids = {id(p) for p in params}
    if isinstance(groups, int):
        count = min(groups, len(params))
        return [tuple(params[len(params) * i // count:len(params) * (i + 1) // count]) for i in range(count)]
    seen: set[int] = set()
    out = []
    for group in groups:
        for p in group:
            if not isinstance(p, torch.Tensor):
                raise ValueError("groups must consist of torch.Tensor parameters")
            if id(p) in seen:
                raise ValueError("a parameter can appear in only one group")
            seen.add(id(p))
        out.append(tuple(p for p in group if id(p) in ids))
    out += [(p,) for p in params if id(p) not in seen]
    return [g for g in out if g]
