"""Pruning: masks and choices by hand on small matrices; structural edits against a model built
directly with the kept weights."""

from __future__ import annotations

import pytest
import torch

from instructkit.errors import InputError
from instructkit.models import prune
from tests.tiny import tiny_llama


def test_unstructured_mask_per_row_and_per_matrix():
    scores = torch.tensor([[1.0, 5.0, 3.0, 2.0], [4.0, 0.0, 6.0, 1.0]])
    per_row = prune.unstructured_mask(scores, 0.5)
    assert per_row.tolist() == [[False, True, True, False], [True, False, True, False]]
    whole = prune.unstructured_mask(scores, 0.5, per_row=False)
    # the four lowest of the matrix: 0, 1, 1, 2
    assert whole.tolist() == [[False, True, True, False], [True, False, True, False]]
    whole = prune.unstructured_mask(scores, 0.25, per_row=False)  # two lowest: 0 and the first 1
    assert whole.tolist() == [[False, True, True, True], [True, False, True, True]]
    assert prune.unstructured_mask(scores, 0.0).all()


def test_wanda_keeps_the_weight_with_the_large_input():
    weight = torch.tensor([[1.0, 2.0], [3.0, 0.5]])
    norms = torch.tensor([10.0, 1.0])
    wanda = prune.unstructured_mask(prune.wanda_scores(weight, norms), 0.5)
    magnitude = prune.unstructured_mask(prune.magnitude_scores(weight), 0.5)
    assert wanda.tolist() == [[True, False], [True, False]]  # scores 10, 2 | 30, 0.5
    assert magnitude.tolist() == [[False, True], [True, False]]


def test_two_four_keeps_two_of_every_four():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 9.0, 8.0, 7.0]])
    mask = prune.n_m_mask(scores)
    assert mask.tolist() == [[True, False, True, False, False, True, True, False]]
    assert prune.follows_n_m(mask)
    assert not prune.follows_n_m(prune.unstructured_mask(scores, 0.5))  # 3 kept in the second group
    with pytest.raises(InputError, match="multiple"):
        prune.n_m_mask(torch.ones(2, 6))


@pytest.mark.parametrize("sparsity", [-0.1, 1.0])
def test_sparsity_outside_range(sparsity):
    with pytest.raises(InputError, match="sparsity"):
        prune.unstructured_mask(torch.ones(2, 2), sparsity)


def test_angular_distance_by_hand():
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert prune.angular_distance(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert prune.angular_distance(x, -x).item() == pytest.approx(1.0)
    y = torch.tensor([[0.0, 1.0], [1.0, 1.0]])  # 90 degrees, then 0
    assert prune.angular_distance(x, y).item() == pytest.approx(0.25)


def test_layers_to_drop_picks_the_block_that_changes_least():
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(16, 8, generator=g)
    h1 = torch.randn(16, 8, generator=g)
    h2 = h1 + 0.01 * torch.randn(16, 8, generator=g)  # layer 1 barely changes its input
    h3 = torch.randn(16, 8, generator=g)
    drop, distances = prune.layers_to_drop([h0, h1, h2, h3], 1)
    assert drop == [1]
    assert len(distances) == 3 and distances[1] == min(distances)
    with pytest.raises(InputError):
        prune.layers_to_drop([h0, h1], 1)


def _batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    return {"input_ids": ids, "attention_mask": mask}


def test_drop_layers_equals_a_model_built_with_the_kept_layers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(64, num_hidden_layers=4).eval()
    reference = tiny_llama(64, num_hidden_layers=2).eval()
    state = model.state_dict()
    mapped = {}
    for k, v in state.items():
        if k.startswith("model.layers."):
            i = int(k.split(".")[2])
            if i in (0, 3):
                mapped[k.replace(f"model.layers.{i}.", f"model.layers.{[0, 3].index(i)}.")] = v
        else:
            mapped[k] = v
    reference.load_state_dict(mapped)
    prune.drop_layers(model, [1, 2])
    batch = _batch(64)
    torch.testing.assert_close(model(**batch).logits, reference(**batch).logits)
    # with a KV cache too: generation indexes the cache by layer_idx
    ids = batch["input_ids"][:1]
    assert (
        model.generate(ids, max_new_tokens=5, do_sample=False).tolist()
        == reference.generate(ids, max_new_tokens=5, do_sample=False).tolist()
    )
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 2
    torch.testing.assert_close(reloaded(**batch).logits, reference(**batch).logits)


def test_input_norms_by_hand():
    model = tiny_llama(64).eval()
    batch = _batch(64)
    norms = prune.input_norms(model, [batch])
    layer = model.model.layers[0]
    x = layer.input_layernorm(model.model.embed_tokens(batch["input_ids"]))  # the input of q, k and v
    real = x[batch["attention_mask"].bool()]
    expected = real.double().pow(2).sum(0).sqrt()
    torch.testing.assert_close(norms["layers.0.self_attn.q_proj"], expected)
    assert set(norms) == set(prune.prunable_linears(model))


def test_wanda_and_two_four_on_a_model():
    model = tiny_llama(64).eval()
    norms = prune.input_norms(model, [_batch(64)])
    linears = prune.prunable_linears(model)
    masks = {n: prune.n_m_mask(prune.wanda_scores(m.weight, norms[n])) for n, m in linears.items()}
    prune.apply_masks(model, masks)
    for name, m in linears.items():
        assert prune.follows_n_m(m.weight != 0), name
    assert prune.sparsity_of(model) == pytest.approx(0.5)


def test_sequential_wanda_equals_pruning_layer_by_layer_through_the_whole_model():
    """The reference runs the whole model once per decoder layer, measuring layer l's input norms
    (the model's own forward, through :func:`input_norms`) after layers 0..l-1 were pruned."""
    batches = [_batch(64), _batch(64, seed=1)]
    model, reference = tiny_llama(64).eval(), tiny_llama(64).eval()  # seeded: the same weights

    def keep(m, norms):
        return prune.unstructured_mask(prune.wanda_scores(m.weight, norms), 0.5)

    masks = prune.sequential_masks(model, batches, keep)

    ref_linears = prune.prunable_linears(reference)
    expected = {}
    for i in range(reference.config.num_hidden_layers):
        norms = prune.input_norms(reference, batches)
        layer = {n: m for n, m in ref_linears.items() if n.startswith(f"layers.{i}.")}
        expected.update({n: keep(m, norms[n]) for n, m in layer.items()})
        prune.apply_masks(reference, {n: expected[n] for n in layer})
    assert set(masks) == set(expected) == set(ref_linears)
    for name in masks:
        assert torch.equal(masks[name], expected[name]), name
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    # and it is not the one-pass rule: the dense model's norms pick other weights in the later layers
    dense = tiny_llama(64).eval()
    one_pass = prune.input_norms(dense, batches)
    dense_linears = prune.prunable_linears(dense)
    last = [n for n in masks if n.startswith("layers.1.")]
    assert any(not torch.equal(masks[n], keep(dense_linears[n], one_pass[n])) for n in last)


def test_removing_dead_ffn_channels_changes_nothing():
    model = tiny_llama(64).eval()
    dead = torch.tensor([1, 5, 9, 60])
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, dead] = 0.0
    batch = _batch(64)
    before = model(**batch).logits
    norms = prune.ffn_activation_norms(model, [batch])
    keep = {}
    for i, layer in enumerate(model.model.layers):
        scores = prune.ffn_channel_scores(norms[i], layer.mlp.down_proj.weight)
        keep[i] = prune.channels_to_keep(scores, 64 - len(dead))
        assert not set(dead.tolist()) & set(keep[i].tolist())
    prune.keep_ffn_channels(model, keep)
    assert model.config.intermediate_size == 60
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (60, 32)
    torch.testing.assert_close(model(**batch).logits, before)
