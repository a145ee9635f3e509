"""The one batched evaluation pass: a module in eval mode, without gradients, over examples in
batches, put back in the mode it was in afterwards.

Held-out losses, reference log-probs, reward-model scores and eval suites all run this loop;
writing it once keeps the two easy mistakes out of all of them (leaving the model in eval mode
after a mid-training evaluation, and building an autograd graph nobody will use).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode under ``torch.no_grad()``; its training flag is restored after."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        module.train(was_training)


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def to_device(batch: Any, device: torch.device) -> Any:
    """A collated batch (a dict of tensors, or an object with ``.to``) on ``device``."""
    if isinstance(batch, dict):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch.to(device) if hasattr(batch, "to") else batch


def no_grad_batches(
    module: nn.Module,
    examples: Sequence[Any],
    collate: Callable[[list[Any]], Any],
    batch_size: int,
    *,
    device: torch.device | None = None,
) -> Iterator[tuple[list[Any], Any]]:
    """Yield ``(chunk, batch)``: each run of ``batch_size`` examples and its collated batch on
    the module's device, with ``module`` in eval mode and gradients off for the whole loop."""
    device = device if device is not None else module_device(module)
    with eval_mode(module):
        for start in range(0, len(examples), batch_size):
            chunk = list(examples[start : start + batch_size])
            yield chunk, to_device(collate(chunk), device)
