"""The split (backbone + chunked head) loss equals the loss on the model's own logits."""

from __future__ import annotations

import pytest
import torch

from instructkit.losses.token_ce import IGNORE_INDEX, token_cross_entropy
from instructkit.models.lm import CausalLMLoss, split_model
from tests.tiny import tiny_llama


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(0, 100, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX
    labels[mask == 0] = IGNORE_INDEX
    return ids, mask, labels


@pytest.mark.parametrize("lora", [False, True])
def test_split_loss_and_grads_equal_full_logits(lora):
    model = tiny_llama(100).double()
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    assert split_model(model) is not None
    ids, mask, labels = _batch()
    loss, n = CausalLMLoss(model, chunk_size=4)(ids, mask, labels)
    loss.backward()
    ours = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    ref, n_ref = token_cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels)
    ref.backward()
    assert n.item() == n_ref.item() == int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    for k, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(ours[k], p.grad, atol=1e-10), k
