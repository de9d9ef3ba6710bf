"""A ZeRO-partitioned optimiser's state, whole: what a DeepSpeed run resumes from on another
number of ranks.

ZeRO stages 1 and 2 split the fp32 master weights and the optimiser state into flat partitions,
one per rank; DeepSpeed's own checkpoint holds those partitions and loads only on the world size
that wrote it. Beside it, every checkpoint gets one file with each parameter's full fp32 master
weight and optimiser state (gathered with DeepSpeed's safe_get_full_* helpers), the module's
weights and buffers, and the optimiser's per-group scalars (e.g. Adam's step). Loading it on any
world size puts each rank's slice back with safe_set_full_*.
"""

from __future__ import annotations

import os
from typing import Dict

import torch
import torch.distributed as dist

FILE = "zero_consolidated.pt"


def _flat_states(zero_optimizer) -> list:
    """The inner torch optimiser's state of every flat partition (one per parameter group)."""
    inner = zero_optimizer.optimizer
    return [inner.state[p] for group in inner.param_groups for p in group["params"] if p in inner.state]


def save_consolidated(model: torch.nn.Module, zero_optimizer, path: str) -> None:
    """Collective (every rank calls it; rank 0 writes `path`)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    _link_optimizer_state(zero_optimizer)
    flat = _flat_states(zero_optimizer)
    keys = sorted(k for k, v in (flat[0].items() if flat else ()) if torch.is_tensor(v) and v.dim() > 0)
    scalars = {k: (v.item() if torch.is_tensor(v) else v) for k, v in (flat[0].items() if flat else ())
               if not (torch.is_tensor(v) and v.dim() > 0)}
    fp32: Dict[str, torch.Tensor] = {}
    state: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        fp32[name] = safe_get_full_fp32_param(p).detach().cpu()
        state[name] = {k: safe_get_full_optimizer_state(p, k).detach().cpu() for k in keys}
    if dist.get_rank() == 0:
        module = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        tmp = path + ".tmp"
        torch.save({"module": module, "fp32": fp32, "state": state, "scalars": scalars}, tmp)
        os.replace(tmp, path)


def load_consolidated(model: torch.nn.Module, zero_optimizer, path: str) -> None:
    """Put a consolidated state back into this world size's partitions (every rank calls it)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    saved = torch.load(path, map_location="cpu", weights_only=True)
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in saved["module"].items()})
    _create_optimizer_state(zero_optimizer)
    for name, p in model.named_parameters():
        if name not in saved["fp32"]:
            continue
        safe_set_full_fp32_param(p, saved["fp32"][name].to(device))
        for key, value in saved["state"][name].items():
            safe_set_full_optimizer_state(p, value.to(device), key)
    for flat_state in _flat_states(zero_optimizer):
        for key, value in saved["scalars"].items():
            old = flat_state.get(key)
            flat_state[key] = torch.tensor(value, dtype=old.dtype, device=old.device) if torch.is_tensor(old) else value


def _create_optimizer_state(zero_optimizer) -> None:
    """The inner optimiser creates its state lazily, at its first step: take one with zero
    gradients and a zero lr (which changes no weight), then link DeepSpeed's per-parameter views
    of it, so that the whole state can be written into it."""
    inner = zero_optimizer.optimizer
    lrs = [g["lr"] for g in inner.param_groups]
    flats = [p for g in inner.param_groups for p in g["params"]]
    grads = [p.grad for p in flats]
    for g in inner.param_groups:
        g["lr"] = 0.0
    for p in flats:
        p.grad = torch.zeros_like(p)
    inner.step()
    for p, grad in zip(flats, grads):
        p.grad = grad
    for g, lr in zip(inner.param_groups, lrs):
        g["lr"] = lr
    _link_optimizer_state(zero_optimizer)


def _link_optimizer_state(zero_optimizer) -> None:
    """DeepSpeed's per-parameter views of the flat optimiser state (what safe_*_optimizer_state
    read and write) are made once, lazily; made anew here, they see the state tensors as they
    are now (a load replaces them)."""
    zero_optimizer._hp_optimizer_states_linked = False
    zero_optimizer._lazy_init_hp_params_optimizer_state()
