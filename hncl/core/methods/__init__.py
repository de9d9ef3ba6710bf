"""Pretraining methods, one module each, found by `method.name`.

Adding a method: one module here with a `Method` subclass (its own options, if any, in a
`Config` dataclass: a subclass of hncl.config.MethodConfig with their defaults and ranges), and
one line in METHODS. The config (hncl.config), the engine (hncl.train.engine) and the
pretraining loop (hncl.train.loop) need no change: the method section takes the chosen method's
Config, the loop calls `training_step`, and the engine checkpoints `state_dict` per rank.

METHODS maps names to "module:Class": a module is imported only when its method is chosen.
"""

import importlib

METHODS = {
    "simclr": "hncl.core.methods.simclr:SimCLR",  # two views only: the baseline
    "nnclr": "hncl.core.methods.nnclr:NNCLR",  # + embedding-nearest queue entry (exactly NNCLR)
    "hncl": "hncl.core.methods.hncl:HNCL",  # + heatmap-nearest queue entries and in-batch faces
    "supervised": "hncl.core.methods.supervised:Supervised",  # labels as positives: the upper bound
}


def method_class(name: str):
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_method(cfg, model, device="cpu", descriptor=None, autocast=None):
    """The method `cfg.method.name` for a (possibly DDP/DeepSpeed-wrapped) model; call after the
    process group is up (a queue is split over its ranks)."""
    return method_class(str(cfg.method.name))(cfg, model, device=device, descriptor=descriptor, autocast=autocast)
