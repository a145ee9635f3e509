"""Every method of ``peft_methods.METHODS`` on a tiny Llama built from a config: it trains what it
says, a few steps lower the loss, save -> load gives the same logits, merging (where the method
merges) gives the same logits, prompt-learning adapters generate in batches as they do alone,
and the inputs a method cannot use are refused with an InputError that says why."""

from __future__ import annotations

import copy
import re
import typing

import pytest
import torch

from instructkit import config as config_module
from instructkit.config import PeftConfig, SFTConfig, load_config
from instructkit.data.collate import pad_batch
from instructkit.data.schema import Message
from instructkit.errors import InputError
from instructkit.generation import generate, prepends_virtual_tokens
from instructkit.losses.token_ce import token_cross_entropy
from instructkit.models.lm import CausalLMLoss
from instructkit.models.loading import load_model
from instructkit.models.peft_methods import INITS, METHODS, apply_method, is_peft
from instructkit.models.reward_model import reward_model_from_causal_lm, sequence_scores
from tests.tiny import hf_greedy_alone, real_tokenizer, tiny_llama, tiny_model_dir

# Every method, and LoRA's inits on the variants that take them ("method+init").
# Tested in their own files: qlora needs a 64-wide base (4-bit blocks), bottleneck adapters save
# their own layout (tests/models/test_qlora.py, tests/models/test_bottleneck.py).
OWN_TESTS = ("qlora", "houlsby", "pfeiffer")
CASES = [
    *(m for m in METHODS if m not in OWN_TESTS),
    "lora+gaussian",
    "lora+pissa",
    "lora+olora",
    "dora+pissa",
    "rslora+olora",
]
MERGING = [c for c in CASES if METHODS[c.split("+")[0]].merges]
PROMPT_LEARNING = ["prompt_tuning", "prefix_tuning", "p_tuning"]

# What each method trains: every trainable parameter's name matches.
TRAINS = {
    "full": r"",
    "freeze": r"^model\.(layers|norm)\.",  # every decoder layer (trainable_layers 0); embeddings frozen
    "bitfit": r"\.bias$",
    "lora": r"\.lora_[AB]\.",
    "dora": r"\.lora_(A|B|magnitude_vector)\.",
    "rslora": r"\.lora_[AB]\.",
    "vera": r"\.vera_lambda_[bd]\.",  # the random projections are frozen and shared
    "loha": r"\.hada_",
    "lokr": r"\.lokr_w[12]\.",
    "ia3": r"\.ia3_l\.",
    "ln_tuning": r"\.ln_tuning_layers\.",
    "prompt_tuning": r"^prompt_encoder\.",
    "prefix_tuning": r"^prompt_encoder\.",
    "p_tuning": r"^prompt_encoder\.",  # the virtual tokens' embedding and the MLP that maps them
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Base model folders: a bias-free tiny Llama (as Llama and SmolLM2 are) and one with biases."""
    root = tmp_path_factory.mktemp("bases")
    return {
        "plain": tiny_model_dir(root / "plain"),
        "biased": tiny_model_dir(root / "biased", attention_bias=True, mlp_bias=True),
    }


def _config(case: str) -> PeftConfig:
    method, _, init = case.partition("+")
    return PeftConfig(method=method, init=init or "default", r=4, alpha=8, vera_r=8, num_virtual_tokens=4)


def _build(case: str, folder):
    """The model of ``case`` from ``folder``, through apply_method as a recipe would."""
    cfg = _config(case)
    model = load_model(folder, device="cpu", dtype="fp32")
    method = METHODS[cfg.method]
    return apply_method(model, cfg) if "CAUSAL_LM" in method.tasks else method.build(model, cfg, "CAUSAL_LM")


def _folder(folders, case: str):
    return folders["biased" if case == "bitfit" else "plain"]


def _batch():
    """Three rows of 12, 9 and 6 tokens, right-padded; every real token after the first trains."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1000, 1100, (n,), generator=g).tolist() for n in (12, 9, 6)]
    return pad_batch([{"input_ids": r, "labels": r} for r in rows], pad_id=real_tokenizer().pad_token_id)


def _loss(model, batch) -> torch.Tensor:
    """The token-mean LM loss: the recipes' CausalLMLoss where apply_method accepts the method;
    for prompt learning, cross-entropy on peft's own logits (prompt and p-tuning prepend one
    position per virtual token, dropped here)."""
    if not getattr(model, "active_peft_config", None) or not model.active_peft_config.is_prompt_learning:
        total, count = CausalLMLoss(model)(**batch)
        return total / count
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total, count = token_cross_entropy(logits[:, -batch["input_ids"].size(1) :], batch["labels"])
    return total / count


def _perturb(model) -> None:
    """Move every trainable tensor off its initial value, as training would (a fresh LoRA's B is
    0, so an untrained adapter would save and merge trivially)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _save_and_load(model, folder, base_folder):
    """Save as setup.save_final does (adapter + instructkit_base.txt, or whole weights + the
    tokenizer) and load back through models.loading."""
    model.save_pretrained(folder, safe_serialization=True)
    real_tokenizer().save_pretrained(folder)
    if is_peft(model):
        (folder / "instructkit_base.txt").write_text(str(base_folder) + "\n")
    return load_model(folder, device="cpu", dtype="fp32")


@pytest.mark.parametrize("case", CASES)
def test_trains_what_it_says_and_lowers_the_loss(folders, case):
    model = _build(case, _folder(folders, case))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    pattern = TRAINS[case.split("+")[0]]
    assert trainable and all(re.search(pattern, name) for name in trainable), trainable[:4]
    assert METHODS[case.split("+")[0]].adapter == is_peft(model)

    batch = _batch()
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(10):
        loss = _loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    # The losses are deterministic: the smallest drop (ia3, p_tuning) is about 0.03.
    assert losses[-1] < losses[0] - 0.01, losses


@pytest.mark.parametrize("case", CASES)
def test_save_then_load_gives_the_same_logits(folders, case, tmp_path):
    """pissa and olora are the interesting ones: they train over a residual base (the adapter's
    start taken out of each weight), and the folder must still load onto the untouched base
    (peft redoes the decomposition when it loads them)."""
    base = _folder(folders, case)
    model = _build(case, base)
    _perturb(model)
    batch = _batch()
    before = _logits(model, batch)
    loaded = _save_and_load(model, tmp_path / "final", base)
    assert is_peft(loaded) == METHODS[case.split("+")[0]].adapter
    torch.testing.assert_close(_logits(loaded, batch), before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", MERGING)
def test_merged_weights_give_the_adapters_logits(folders, case, tmp_path):
    base = _folder(folders, case)
    model = _build(case, base)
    _perturb(model)
    batch = _batch()
    loaded = _save_and_load(model, tmp_path / "final", base)
    adapter = _logits(loaded, batch)
    merged = loaded.merge_and_unload()
    assert not is_peft(merged)
    torch.testing.assert_close(_logits(merged, batch), adapter, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", [m for m in METHODS if METHODS[m].adapter and m not in OWN_TESTS])
def test_the_registry_says_which_adapters_merge(folders, method):
    """Prompt-learning adapters are activations (virtual tokens, a key/value prefix), not weight
    updates: peft has no merge_and_unload for them."""
    model = _build(method, _folder(folders, method))
    assert hasattr(model, "merge_and_unload") == METHODS[method].merges
    assert METHODS[method].merges == (method not in PROMPT_LEARNING)


WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]
GENERATION_PROMPTS = [[Message("user", " ".join(WORDS[: 1 + i]))] for i in range(8)]  # 1 to 8 words


@pytest.mark.parametrize("method", PROMPT_LEARNING)
def test_batched_generation_equals_peft_alone(tmp_path, method):
    """instructkit.generation.generate on 8 prompts of different lengths (one left-padded batch
    for prefix tuning; one prompt at a time for prompt and p-tuning, whose virtual tokens peft
    puts before the padding) gives the greedy text of peft's own generate, prompt by prompt.
    The base is a sharper random Llama (initializer_range 0.5), whose greedy text differs from
    prompt to prompt, and the virtual tokens are scaled up so that they change it."""
    tokenizer = real_tokenizer()
    base = tiny_model_dir(tmp_path / "base", initializer_range=0.5)
    model = _build(method, base)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 1.0)
    model = _save_and_load(model, tmp_path / "final", base).eval()
    assert prepends_virtual_tokens(model) == (method != "prefix_tuning")

    ours = generate(model, tokenizer, GENERATION_PROMPTS, max_new_tokens=8)
    assert ours == hf_greedy_alone(model, tokenizer, GENERATION_PROMPTS, max_new_tokens=8)
    plain = generate(load_model(base, device="cpu", dtype="fp32"), tokenizer, GENERATION_PROMPTS, max_new_tokens=8)
    assert ours != plain and len(set(ours)) > 1  # the virtual tokens matter, and the prompts do


@pytest.mark.parametrize("method", [m for m in METHODS if "SEQ_CLS" in METHODS[m].tasks and m not in OWN_TESTS])
def test_reward_model_head_trains_with_every_method_that_takes_seq_cls(method):
    tokenizer = copy.deepcopy(real_tokenizer())
    causal_lm = tiny_llama(len(tokenizer), attention_bias=method == "bitfit")
    model = apply_method(reward_model_from_causal_lm(causal_lm, tokenizer), _config(method), task="SEQ_CLS")
    assert any("score" in name for name, p in model.named_parameters() if p.requires_grad)
    ids = torch.randint(1000, 1100, (2, 6))
    sequence_scores(model, ids, torch.ones_like(ids)).sum().backward()
    head = [p for name, p in model.named_parameters() if p.requires_grad and "score" in name]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head)


# ----------------------------------------------------------------------------------------------
# Bad input


def test_unknown_method_is_refused_at_config_load_with_a_suggestion():
    with pytest.raises(InputError) as err:
        load_config(SFTConfig, overrides=["peft.method=lorra"])
    assert "'peft.method=lorra'" in str(err.value) and "did you mean 'lora'" in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "field", "says"),
    [
        (["peft.method=vera", "peft.init=pissa"], "peft.init", "lora, dora, rslora"),
        (["peft.method=ia3", "peft.dropout=0.1"], "peft.dropout", "no adapter dropout"),
        (["peft.init=svd"], "peft.init", "pissa"),
        (["peft.method=prompt_tuning", "peft.num_virtual_tokens=0"], "peft.num_virtual_tokens", "at least 1"),
        (["peft.method=vera", "peft.vera_r=0"], "peft.vera_r", "at least 1"),
        (["peft.method=p_tuning", "peft.encoder_hidden_size=0"], "peft.encoder_hidden_size", "at least 1"),
    ],
)
def test_options_a_method_cannot_use_are_refused_at_config_load(overrides, field, says):
    with pytest.raises(InputError) as err:
        load_config(SFTConfig, overrides=overrides)
    assert f"'{field}=" in str(err.value) and says in str(err.value)  # located at the override


def test_bitfit_on_a_bias_free_model_names_ln_tuning():
    with pytest.raises(InputError) as err:
        apply_method(tiny_llama(64), PeftConfig(method="bitfit"))
    assert err.value.field == "peft.method" and "no" in str(err.value) and "ln_tuning" in str(err.value)


@pytest.mark.parametrize("task", ["CAUSAL_LM", "SEQ_CLS"])
@pytest.mark.parametrize("method", PROMPT_LEARNING)
def test_prompt_learning_trains_both_tasks(method, task):
    """models.lm.outputs_at and reward_model.sequence_scores put the virtual tokens in
    (tests/models/test_prompt_learning.py checks them against peft's forward), so apply_method
    takes prompt learning for causal LMs and reward/value models."""
    assert is_peft(apply_method(tiny_llama(64), PeftConfig(method=method, num_virtual_tokens=2), task=task))


def test_config_choices_equal_the_registries():
    assert set(typing.get_args(config_module.PeftMethod)) == set(METHODS)
    assert set(typing.get_args(config_module.PeftInit)) == set(INITS)
