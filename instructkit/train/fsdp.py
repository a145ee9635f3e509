"""FSDP for :func:`instructkit.train.engine.fit`: parameters, gradients and optimizer state
sharded across processes with torch's ``fully_shard`` (FSDP2), on CPUs (gloo) as on GPUs.

Why not accelerate's FSDP plugin: accelerate 1.15 turns FSDP on only for GPU-like process
groups; with ``cpu=True`` and ``ACCELERATE_USE_FSDP=true`` it silently runs DDP. torch's own
``fully_shard`` runs anywhere a process group does, so the engine applies it itself.

How a run goes: :class:`Sharded` deep-copies the loss module (which holds the model), shards the
copy (each transformer block a unit of its own, the rest in the root unit) and moves the original
to the meta device, so only the shards hold memory while it trains. Checkpoints hold *full*
tensors in the one-process layout (the trainable weights by name, the optimizer state by
parameter index as ``torch.optim`` writes it), so a run checkpointed on 2 processes resumes on
1, or on 4, unchanged. When training ends, :meth:`Sharded.release` gathers the full weights back
into the original module, which the stage then saves as it always does.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from instructkit.errors import InputError

if TYPE_CHECKING:
    from instructkit.config import FSDPMode


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (the classes transformers names in ``_no_split_modules``),
    outermost first; each becomes an FSDP unit of its own."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    return [b for b in blocks if not any(b is not o and _contains(o, b) for o in blocks)]


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def device_mesh(mode: FSDPMode, accelerator):
    """``full``: one dimension over every process. ``hybrid``: replicate across nodes, shard
    within a node (``LOCAL_WORLD_SIZE`` processes per node, as torchrun sets it)."""
    import os

    from torch.distributed.device_mesh import init_device_mesh

    world = accelerator.num_processes
    kind = accelerator.device.type
    if mode == "full":
        return init_device_mesh(kind, (world,), mesh_dim_names=("shard",))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world % local:
        raise InputError(f"{world} processes do not split into nodes of {local}", field="train.fsdp")
    return init_device_mesh(kind, (world // local, local), mesh_dim_names=("replicate", "shard"))


class Sharded:
    """A sharded copy of ``loss_module`` (and of ``model`` inside it) to train; the original
    waits on the meta device until :meth:`release`."""

    def __init__(self, loss_module: nn.Module, model: nn.Module, mode: FSDPMode, accelerator) -> None:
        from torch.distributed.fsdp import fully_shard

        owned = {id(p) for p in model.parameters()}
        stray = [n for n, p in loss_module.named_parameters() if p.requires_grad and id(p) not in owned]
        if stray:
            raise InputError(f"train.fsdp: the loss module trains parameters outside the model ({stray[0]})")
        memo: dict[int, Any] = {}
        self.loss_module = copy.deepcopy(loss_module, memo)
        self.model: nn.Module = memo[id(model)]
        self.original = loss_module
        mesh = device_mesh(mode, accelerator)
        blocks = transformer_blocks(self.loss_module)  # the policy's, and a reference model's
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.loss_module, mesh=mesh)
        self.trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.device = accelerator.device
        loss_module.to("meta")
        # What this process holds: its shards (DTensor.numel() is the whole tensor's).
        params = list(self.loss_module.parameters())
        self.held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
        self.total = sum(p.numel() for p in params)
        accelerator.print(
            f"fsdp {mode}: {len(blocks)} blocks and the rest sharded over {accelerator.num_processes} processes; "
            f"this process holds {self.held:,} of {self.total:,} parameter values"
        )

    # -- weights -------------------------------------------------------------------------------

    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, **kw)

    def full_state(self, module: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Every parameter and persistent buffer of the model (or ``module``), gathered in full
        on every process (a collective: all processes call it)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(module or self.model, options=self._options())

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable weights in full, by name, on the CPU (collective)."""
        full = self.full_state()
        return {n: full[n].detach().cpu().contiguous() for n in self.trainable}

    def load_trainable(self, weights: dict[str, torch.Tensor]) -> None:
        """Full trainable weights (a checkpoint's) into the shards."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.model, weights, options=self._options(strict=False))

    # -- optimizer state, in the one-process layout ------------------------------------------

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        """``optimizer.state_dict()`` as one process holding the whole model would write it:
        full tensors, parameters numbered in the order of the trainable parameters (collective)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        full = get_optimizer_state_dict(self.model, _inner(optimizer), options=self._options())
        index = {name: i for i, name in enumerate(self.trainable)}
        state = {
            index[name]: {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in s.items()}
            for name, s in full["state"].items()
        }
        groups = [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_optimizer_state(self, optimizer, saved: dict[str, Any]) -> None:
        """A one-process ``optimizer.state_dict()`` (by index) into the sharded optimizer."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        names = self.trainable
        full = {
            "state": {names[int(i)]: s for i, s in saved["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in saved["param_groups"]],
        }
        set_optimizer_state_dict(self.model, _inner(optimizer), full, options=self._options())

    # -- the end --------------------------------------------------------------------------------

    def release(self) -> None:
        """The trained weights, gathered in full, back into the original module (collective);
        the sharded copy is dropped."""
        full = self.full_state(self.loss_module)
        buffers = {n: b.detach().clone() for n, b in self.loss_module.named_buffers()}
        self.original.to_empty(device=self.device)
        self.original.load_state_dict(full, strict=False)
        with torch.no_grad():
            for name, buffer in self.original.named_buffers():
                buffer.copy_(buffers[name])
        missing = {n for n, _ in self.original.named_parameters()} - set(full)
        if missing:
            raise RuntimeError(f"FSDP release: no full weights for {sorted(missing)[0]}")
        self.loss_module = self.model = None  # type: ignore[assignment]


def _inner(optimizer):
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)
