"""One frozen base for LoRA runs: the teacher, a LoRA generator and a LoRA fake score hold the SAME base tensors.

Why: a LoRA generator or fake score trains only its adapters; its base weights are the teacher's,
frozen for the whole run.  Three copies of a 12B base are 72 GB in bf16; a shared base is one copy
plus the adapters (``generator.lora.shared_base`` / ``fake_score.lora.shared_base``, default on).

How: every network keeps its own module tree -- its own PEFT adapter (named ``default``, as
without sharing), its own activation-checkpoint and compile wrappers, its own forward hooks
(discriminator features, DMD2's GAN head) -- and each of its parameters and buffers that equals
the teacher's same-named tensor IS the teacher's tensor object.  So a forward computes exactly
what it computes with three copies: the teacher the bare base, the generator base + its adapter,
the fake score base + its own adapter (the equality tests check losses and adapters step for
step).  Gradients cannot cross: the shared tensors never require grad, and each network's
adapter parameters are its own objects that only its own loss reaches.

Why not one PEFT model with two named adapters switched per call: the active adapter is Python
state read at forward time; activation checkpointing recomputes a block's forward during
backward, after the call has switched the adapter back, and ``torch.compile`` guards (and
recompiles) on it.  Module trees over shared tensors have neither hazard, and keep every
parameter name that IDA, checkpoints, the EMA and the student export match.

Limits: single-process runs.  Every multi-process strategy is FSDP2 (``train/distributed.py``),
which shards each network on its own and would turn one shared tensor into a set of shards per
network; such runs keep a copy per network (a warning says so).  Building makes no second copy
for families whose ``make_student`` deep-copies the teacher (:func:`deepcopy_shares`); a family
that rebuilds the student (FLUX without its guidance embedder) makes one transient copy, freed as
soon as it is tied to the teacher.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from .teachers.base import SenseflowError

#: attribute set on a teacher tensor that a LoRA network shares (checkpoints skip such tensors)
SHARED_FLAG = "_senseflow_shared_base"


def is_shared(t: Tensor) -> bool:
    return bool(getattr(t, SHARED_FLAG, False))


def wants_shared_base(lora: Any, name: str, sharded: bool) -> bool:
    """Whether network ``name`` (its ``lora`` config, or None) shares the teacher's base in this run."""
    if lora is None or not getattr(lora, "shared_base", False):
        return False
    if sharded:
        warnings.warn(f"{name}.lora.shared_base: multi-process (FSDP2) runs shard each network on its own, so the "
                      f"{name} keeps its own copy of the base weights (the shared base is single-process only)",
                      stacklevel=2)
        return False
    return True


@contextlib.contextmanager
def deepcopy_shares(module: nn.Module) -> Iterator[None]:
    """Inside the context ``copy.deepcopy`` hands back ``module``'s own parameter and buffer tensors.

    ``make_student`` / ``make_fake_score`` deep-copy the teacher backbone; with this the copy is a
    new module tree over the teacher's tensors, so building allocates no second set of weights.
    A family method that changed one of those tensors in place would have changed the teacher:
    refused when autograd's version counter saw it (writes through ``.data`` bypass the counter).
    """
    tensors = list({id(t): t for t in (*module.parameters(), *module.buffers())}.values())
    versions = [t._version for t in tensors]
    for t in tensors:
        t.__deepcopy__ = (lambda memo, _t=t: _t)     # copy.deepcopy looks the hook up on the instance
    try:
        yield
    finally:
        for t in tensors:
            del t.__deepcopy__
    if any(t._version != v for t, v in zip(tensors, versions)):
        raise SenseflowError("the family's make_student / make_fake_score changed the teacher's weights in place; "
                             "set generator.lora.shared_base and fake_score.lora.shared_base to false")


@torch.no_grad()
def share_frozen_base(network: nn.Module, teacher: nn.Module) -> int:
    """Point every tensor of ``network`` equal to the teacher's same-named one at the teacher's; returns how many.

    Matched per module (same module path, same slot name), so a network whose architecture differs
    (FLUX's student without the guidance embedder) shares everything the two have in common.
    Tensors that differ in shape, dtype, device or value stay the network's own.
    """
    twins = dict(teacher.named_modules())
    shared = 0
    for path, module in network.named_modules():
        twin = twins.get(path)
        if twin is None:
            continue
        for slot in ("_parameters", "_buffers"):
            own, theirs = getattr(module, slot), getattr(twin, slot)
            for key, t in list(own.items()):
                ref = theirs.get(key)
                if t is None or ref is None:
                    continue
                if t is not ref:
                    if t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device \
                            or t.is_meta or not torch.equal(t, ref):
                        continue
                    own[key] = ref
                setattr(ref, SHARED_FLAG, True)
                shared += 1
    return shared


def lora_network(make: Callable[[nn.Module], nn.Module], teacher: nn.Module, lora: Any,
                 share: bool) -> nn.Module:
    """A trainable network from the teacher backbone: ``make(teacher)``, then its LoRA adapters (``lora``).

    ``share``: the network's frozen base is the teacher's own tensors (see module docstring);
    otherwise it is a copy, as ``make`` returns it.
    """
    from .lora import maybe_apply_lora

    if lora is None or not share:
        return maybe_apply_lora(make(teacher).requires_grad_(True).train(), lora)
    with deepcopy_shares(teacher):
        net = make(teacher)
    share_frozen_base(net, teacher)
    net = maybe_apply_lora(net.train(), lora)      # freezes every non-adapter tensor, the shared ones included
    leaked = [n for n, p in net.named_parameters() if p.requires_grad and is_shared(p)]
    if leaked:  # pragma: no cover - apply_lora freezes all but the adapters
        raise SenseflowError(f"shared base: {leaked[0]} would train the teacher's weight")
    return net


def shared_state_keys(module: nn.Module) -> set[str]:
    """State-dict keys of ``module`` that are frozen tensors shared with the teacher (checkpoints skip them)."""
    keys = {n for n, p in module.named_parameters(remove_duplicate=False) if is_shared(p)}
    keys |= {n for n, b in module.named_buffers(remove_duplicate=False) if is_shared(b)}
    return keys


def has_shared_base(module: nn.Module) -> bool:
    return any(is_shared(t) for t in (*module.parameters(), *module.buffers()))


def weight_bytes(*modules: nn.Module) -> int:
    """Bytes of the DISTINCT storages behind the modules' parameters and buffers (what is allocated for them)."""
    seen: dict[int, int] = {}
    for module in modules:
        for t in (*module.parameters(), *module.buffers()):
            storage = t.untyped_storage()
            seen[storage.data_ptr() if storage.data_ptr() else id(storage)] = storage.nbytes()
    return sum(seen.values())


__all__ = ["SHARED_FLAG", "deepcopy_shares", "has_shared_base", "is_shared", "lora_network", "share_frozen_base",
           "shared_state_keys", "wants_shared_base", "weight_bytes"]
