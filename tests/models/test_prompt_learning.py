"""peft prompt tuning, p-tuning and prefix tuning through instructkit's own paths.

The loss paths call the backbone, not peft's wrapper forward, and put the virtual tokens in
themselves (``models.lm.virtual_token_inputs``). The peer for every number here is peft 0.21.2's
own forward and ``generate`` on the same model: log-probs at the real positions equal peft's
``model(**inputs).logits``; where peft itself counts left padding as positions (prompt and
p-tuning drop position ids), the peer is peft on each row alone, which is what generation and
rollouts must agree with. Then: SFT, DPO and a reward model train with each method, generation
and PPO rollouts batch and give peft's greedy text prompt by prompt, the PPO reference is the
policy with the adapter off, and architectures whose cache cannot take a key/value prefix are
refused up front.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from instructkit.config import PeftConfig
from instructkit.data.collate import collate_packed, pack_examples, pad_batch
from instructkit.data.schema import Message
from instructkit.data.templates import encode_prompt
from instructkit.errors import InputError
from instructkit.generation import decode_response, generate, stop_tokens
from instructkit.models.lm import CausalLMLoss, outputs_at, prefix_cache_problem, sequence_log_probs
from instructkit.models.peft_methods import METHODS, apply_method
from instructkit.models.reward_model import reward_model_from_causal_lm, sequence_scores
from instructkit.train.rollout import Rollout, adapter_disabled, position_ids, response_logprobs, sample
from tests.tiny import real_tokenizer, tiny_llama, toy_conversations, toy_preferences, write_jsonl

METHODS_UNDER_TEST = ["prompt_tuning", "p_tuning", "prefix_tuning"]
N_VIRTUAL = 4
VOCAB = 128


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():  # peft warns that it drops position ids for prompt tuning
        warnings.simplefilter("ignore")
        yield


def prompt_model(method: str, *, task: str = "CAUSAL_LM", seed: int = 0, vocab: int = VOCAB, **llama):
    """A tiny Llama with ``method`` applied through apply_method, its virtual tokens (and
    p-tuning's MLP) redrawn from N(0, 1) so that they change the output, in eval mode."""
    model = tiny_llama(vocab, seed=seed, **llama)
    if task == "SEQ_CLS":
        tokenizer = real_tokenizer()
        model = reward_model_from_causal_lm(tiny_llama(len(tokenizer), seed=seed, **llama), _copy(tokenizer))
    model = apply_method(model, PeftConfig(method=method, num_virtual_tokens=N_VIRTUAL), task=task)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def _copy(tokenizer):
    import copy

    return copy.deepcopy(tokenizer)


def rows(lengths, seed=0, vocab=VOCAB) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def peft_logits_alone(model, row: list[int]) -> torch.Tensor:
    """(len(row), V) logits of peft's own forward on one unpadded row, real positions only."""
    ids = torch.tensor([row])
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -len(row) :]


def _left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    from instructkit.generation import left_pad

    return left_pad(prompts, 0, "cpu")  # (B, T) ids, mask 0 on the left padding


def all_logits(out) -> torch.Tensor:
    return out.logits if out.logits is not None else out.hidden @ out.weight.T  # (N, V)


# ----------------------------------------------------------------------------------------------
# 1. The loss paths read through the prompt


@pytest.mark.parametrize("method", METHODS_UNDER_TEST)
def test_right_padded_logits_and_grads_equal_peft_forward(method):
    """Right-padded rows, no position ids (SFT, DPO): peft's own forward is the reference for
    the logits at every real position and for the gradient of the loss on the virtual tokens."""
    model = prompt_model(method).train()  # dropout is 0 in the tiny config; train() takes peft's training branch
    batch = pad_batch([{"input_ids": r, "labels": r} for r in rows([9, 6, 3])], pad_id=0)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]

    ours = all_logits(outputs_at(model, mask.bool(), input_ids=ids, attention_mask=mask))
    reference = model(input_ids=ids, attention_mask=mask).logits[:, -ids.size(1) :]  # (B, T, V)
    torch.testing.assert_close(ours, reference[mask.bool()], rtol=0, atol=1e-5)

    loss, count = CausalLMLoss(model, chunk_size=5)(ids, mask, labels)
    loss.backward()
    ours_grad = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -ids.size(1) :]
    shifted = labels[:, 1:]
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), shifted, reduction="sum")
    ref.backward()
    assert count == (shifted != -100).sum()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert ours_grad and all(p.grad is not None for p in model.prompt_encoder.parameters() if p.requires_grad)
    for k, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours_grad[k], p.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", METHODS_UNDER_TEST)
def test_left_padded_rows_without_position_ids_equal_peft_forward(method):
    """Left padding and no position ids: the model counts positions over everything, as peft."""
    model = prompt_model(method)
    ids, mask = _left_padded(rows([8, 5, 2]))
    with torch.no_grad():
        ours = all_logits(outputs_at(model, mask.bool(), input_ids=ids, attention_mask=mask))
        reference = model(input_ids=ids, attention_mask=mask).logits[:, -ids.size(1) :][mask.bool()]
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", METHODS_UNDER_TEST)
def test_left_padded_rows_with_position_ids_equal_each_row_alone(method):
    """The rollout layout (left padding, positions counting real tokens): each row's logits
    equal peft's forward on that row alone. For prompt and p-tuning peft's own forward on the
    padded batch does not (it drops the position ids), which is why the loss paths do not call it."""
    model = prompt_model(method)
    prompts = rows([8, 5, 2])
    ids, mask = _left_padded(prompts)
    with torch.no_grad():
        ours = all_logits(
            outputs_at(model, mask.bool(), input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
        )
        alone = torch.cat([peft_logits_alone(model, r) for r in prompts])
        peft_padded = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    torch.testing.assert_close(ours, alone, rtol=0, atol=1e-5)
    gap = (peft_padded[:, -ids.size(1) :][mask.bool()] - alone).abs().max().item()
    assert (gap > 1e-4) == (method != "prefix_tuning")  # 100x the tolerance above


@pytest.mark.parametrize("method", METHODS_UNDER_TEST)
def test_packed_rows_equal_each_example_alone(method):
    """Packed rows (4-D block mask, positions restarting at each example): every example sees
    the virtual tokens and computes what it computes alone under peft."""
    model = prompt_model(method)
    examples = [{"input_ids": r, "labels": r} for r in rows([6, 4, 5, 3])]
    batch = collate_packed(pack_examples(examples, max_length=10), pad_id=0)
    with torch.no_grad():
        out = all_logits(
            outputs_at(
                model,
                batch["position_ids"] >= 0,
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"],
            )
        ).view(*batch["input_ids"].shape, -1)
    packed = pack_examples(examples, max_length=10)
    for b, row in enumerate(packed):
        start = 0
        for n, i in zip(row.seq_lens, row.indices):
            alone = peft_logits_alone(model, examples[i]["input_ids"])
            torch.testing.assert_close(out[b, start : start + n], alone, rtol=0, atol=1e-5)
            start += n


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_packed_rows_without_a_mask_are_refused(method):
    model = prompt_model(method)
    examples = [{"input_ids": r, "labels": r} for r in rows([6, 4])]
    batch = collate_packed(pack_examples(examples, max_length=10), pad_id=0, attention="position-ids")
    with pytest.raises(InputError) as err:
        CausalLMLoss(model)(batch["input_ids"], None, batch["labels"], batch["position_ids"])
    assert err.value.field == "data.packing"


@pytest.mark.parametrize("method", METHODS_UNDER_TEST)
def test_sequence_scores_equal_peft_forward_and_the_head_trains(method):
    """Reward/value models (SEQ_CLS): unpadded rows score as peft's own forward does; a padded
    row scores as it does alone (read at its last real token)."""
    model = prompt_model(method, task="SEQ_CLS")
    tokenizer = real_tokenizer()
    prompts = rows([7, 7], vocab=1000)
    ids = torch.tensor(prompts)
    with torch.no_grad():
        ours = sequence_scores(model, ids, torch.ones_like(ids))
        reference = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.squeeze(-1)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    short = prompts[1][:4]
    padded = torch.tensor([prompts[0], short + [tokenizer.pad_token_id] * 3])
    mask = (torch.arange(7) < torch.tensor([[7], [4]])).long()
    with torch.no_grad():
        both = sequence_scores(model, padded, mask)
        alone = sequence_scores(model, torch.tensor([short]), torch.ones(1, 4, dtype=torch.long))
    torch.testing.assert_close(both[1], alone[0], rtol=0, atol=1e-5)


def test_dpo_reference_is_the_plain_model_with_the_adapter_disabled():
    """Inside disable_adapter() the loss paths see no virtual tokens: the base model's log-probs."""
    model = prompt_model("prompt_tuning")
    batch = pad_batch([{"input_ids": r, "labels": r} for r in rows([6, 4])], pad_id=0)
    with torch.no_grad(), model.disable_adapter():
        off, _ = sequence_log_probs(model, **batch)
    with torch.no_grad():
        plain, _ = sequence_log_probs(model.get_base_model(), **batch)
        on, _ = sequence_log_probs(model, **batch)
    torch.testing.assert_close(off, plain, rtol=0, atol=1e-6)
    assert (on - plain).abs().max() > 1e-2  # the virtual tokens matter when the adapter is on


# ----------------------------------------------------------------------------------------------
# The loss falls when the stages train with each method


def _stage_config(tiny, data, out, method: str, **extra) -> dict:
    return {
        "model": str(tiny),
        "out": str(out),
        "data": {"path": str(data), "val_fraction": 0.0, "max_length": 64},
        "peft": {"method": method, "num_virtual_tokens": N_VIRTUAL},
        "optim": {"lr": 0.1, "scheduler": "constant", "warmup_steps": 0},
        "train": {"batch_size": 32, "grad_accum": 1, "max_steps": 8, "progress": False},  # the whole data each step
        **extra,
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A sharper tiny Llama (initializer_range 0.2): at the default 0.02 its output is nearly
    uniform whatever comes before, and virtual tokens have little to move."""
    from tests.tiny import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", initializer_range=0.2)


@pytest.mark.parametrize("method", METHODS_UNDER_TEST)
def test_sft_lowers_the_loss_and_saves_an_adapter(tiny, tmp_path, method):
    from instructkit.models.loading import load_model
    from instructkit.train.sft import sft
    from tests.train.invariants import losses

    data = write_jsonl(tmp_path / "train.jsonl", toy_conversations(32))
    sft(_stage_config(tiny, data, tmp_path / "run", method))
    curve = losses(tmp_path / "run")
    assert curve[-1] < curve[0] - 0.2, curve  # about 0.7 to 0.9 for each method
    loaded = load_model(tmp_path / "run" / "final", device="cpu", dtype="fp32")
    assert loaded.active_peft_config.peft_type == method.upper()


@pytest.mark.parametrize("method", METHODS_UNDER_TEST)
def test_dpo_lowers_the_loss(tiny, tmp_path, method):
    from instructkit.train.dpo import dpo
    from tests.train.invariants import losses

    data = write_jsonl(tmp_path / "pairs.jsonl", toy_preferences(32))
    dpo(_stage_config(tiny, data, tmp_path / "run", method, beta=0.1))
    curve = losses(tmp_path / "run")
    assert curve[-1] < curve[0] - 0.05, curve


@pytest.mark.parametrize("method", METHODS_UNDER_TEST)
def test_reward_model_ranking_loss_falls(method):
    """The reward recipe's loss module (RankingLoss over sequence_scores) on a prompt-learning
    reward model: a few AdamW steps on fixed pairs lower it."""
    from instructkit.data.collate import ranking_collate
    from instructkit.train.reward import RankingLoss

    model = prompt_model(method, task="SEQ_CLS").train()
    pairs = rows([6, 5, 7, 4, 6, 5, 3, 6], seed=3, vocab=1000)
    batch = ranking_collate(0)([{"input_ids": [pairs[i], pairs[i + 1]], "ranks": [0, 1]} for i in range(0, 8, 2)])
    loss_module = RankingLoss(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    curve = []
    for _ in range(8):
        total, count = loss_module(**batch)
        (total / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        curve.append(float(total / count))
    assert curve[-1] < curve[0] - 0.05, curve


# Reward models with virtual tokens: tests/train/test_methods_in_stages.py
# (test_a_prompt_learning_reward_model_scores_the_same_after_reload; they used to be refused).


# ----------------------------------------------------------------------------------------------
# 2. Generation and PPO rollouts

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]
PROMPTS = [[Message("user", " ".join(WORDS[: 1 + i]))] for i in range(8)]  # 1 to 8 words


@pytest.fixture(scope="module")
def chat_models():
    """A sharper random Llama (initializer_range 0.5) on the real tokenizer, whose greedy text
    differs from prompt to prompt, with each method applied and its virtual tokens redrawn."""
    vocab = len(real_tokenizer())
    return {m: prompt_model(m, vocab=vocab, initializer_range=0.5) for m in METHODS_UNDER_TEST}


def peft_greedy_alone(model, tokenizer, max_new_tokens: int) -> list[list[int]]:
    stop_ids, _ = stop_tokens(model, tokenizer, None, None)
    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([encode_prompt(tokenizer, prompt, None)])
        with torch.no_grad():
            new = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
            )[0, ids.size(1) :]
        out.append(new.tolist())
    return out


@pytest.mark.parametrize("method", METHODS_UNDER_TEST)
def test_batched_generation_equals_peft_alone_and_the_prompt_matters(chat_models, method):
    model, tokenizer = chat_models[method], real_tokenizer()
    stop_ids, stop_strings = stop_tokens(model, tokenizer, None, None)
    alone = [decode_response(tokenizer, r, stop_ids, stop_strings) for r in peft_greedy_alone(model, tokenizer, 8)]
    ours = generate(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=8)  # one left-padded batch
    assert ours == alone
    with model.disable_adapter():
        plain = generate(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=8)
    assert sum(a != b for a, b in zip(ours, plain)) >= 4 and len(set(ours)) > 1


def _stop_cut(row: list[int], stop_ids) -> list[int]:
    cut = next((k + 1 for k, t in enumerate(row) if t in stop_ids), len(row))
    return row[:cut]


@pytest.mark.parametrize("method", METHODS_UNDER_TEST)
def test_rollouts_sample_peft_greedy_text_and_recompute_their_logprobs(chat_models, method):
    """rollout.sample in one left-padded batch at a temperature so low that sampling is greedy
    gives peft's greedy tokens prompt by prompt; at temperature 1 the training pass
    (response_logprobs) recomputes the sampling pass's log-probs (PPO's ratio is 1)."""
    model, tokenizer = chat_models[method], real_tokenizer()
    stop_ids, _ = stop_tokens(model, tokenizer, None, None)
    prompt_ids = [encode_prompt(tokenizer, p, None) for p in PROMPTS]
    common = dict(stop_ids=stop_ids, pad_id=tokenizer.pad_token_id, max_new_tokens=6, batch_size=8, seed=0)
    greedy = sample(model, prompt_ids, temperature=1e-4, **common)
    ours = [r[: int(n)].tolist() for r, n in zip(greedy.responses, greedy.lengths)]
    assert ours == [_stop_cut(r, stop_ids) for r in peft_greedy_alone(model, tokenizer, 6)]

    rollout = sample(model, prompt_ids, temperature=1.0, **common)
    with torch.no_grad():
        recomputed = response_logprobs(model, rollout, 1.0, chunk_size=7)
    torch.testing.assert_close(recomputed, rollout.logprobs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", METHODS_UNDER_TEST)
def test_ppo_reference_is_the_policy_with_the_adapter_off(chat_models, method):
    model, tokenizer = chat_models[method], real_tokenizer()
    stop_ids, _ = stop_tokens(model, tokenizer, None, None)
    prompt_ids = [encode_prompt(tokenizer, p, None) for p in PROMPTS[:4]]
    rollout: Rollout = sample(
        model, prompt_ids, stop_ids=stop_ids, pad_id=tokenizer.pad_token_id, max_new_tokens=4, temperature=1.0
    )
    with torch.no_grad():
        with adapter_disabled(model) as base:
            reference = response_logprobs(base, rollout, 1.0)
        plain = response_logprobs(model.get_base_model(), rollout, 1.0)
        policy = response_logprobs(model, rollout, 1.0)
    torch.testing.assert_close(reference, plain, rtol=0, atol=1e-6)
    assert (policy - plain).abs().max() > 1e-2


def test_ppo_trains_a_prompt_tuning_policy_with_a_prompt_tuning_value_model(tiny, tmp_path):
    """Two PPO steps (GAE: the value model is a SEQ_CLS prompt-tuning model too) run and save
    the policy's adapter."""
    from instructkit.models.loading import load_model
    from instructkit.train.ppo import ppo

    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt": [{"role": "user", "content": f"say {c}"}], "target": c} for c in ["red", "blue"] * 4],
    )
    cfg = _stage_config(tiny, prompts, tmp_path / "run", "prompt_tuning")
    cfg["data"] = {"path": str(prompts)}
    cfg.update(
        reward={"function": "tests.train.test_ppo:contains_target"},
        advantage="gae",
        rollout_batch_size=8,
        group_size=1,
        max_new_tokens=3,
        ppo_epochs=1,
    )
    cfg["train"] = {"batch_size": 8, "max_steps": 2, "progress": False}
    summary = ppo(cfg)
    assert summary["steps"] == 2
    assert load_model(tmp_path / "run" / "final", device="cpu", dtype="fp32").active_peft_config.is_prompt_learning


# ----------------------------------------------------------------------------------------------
# 3. Architectures whose cache cannot take a key/value prefix


def _tiny(model_type: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = AutoConfig.for_model(model_type, **small, num_key_value_heads=2, vocab_size=VOCAB, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


HYBRID = dict(  # Qwen3-Next: a linear-attention layer (conv + recurrent state) before a full-attention one
    head_dim=8,
    linear_num_key_heads=2,
    linear_num_value_heads=2,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=16,
    layer_types=["linear_attention", "full_attention"],
)
LATENT = dict(  # DeepSeek-V3: multi-head latent attention
    kv_lora_rank=8,
    q_lora_rank=8,
    qk_rope_head_dim=4,
    qk_nope_head_dim=4,
    v_head_dim=8,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
)


@pytest.mark.parametrize(
    ("model_type", "extra", "says"), [("qwen3_next", HYBRID, "LinearAttentionLayer"), ("deepseek_v3", LATENT, "latent")]
)
def test_prefix_tuning_is_refused_where_the_cache_cannot_take_a_prefix(model_type, extra, says):
    """peft builds the prefix model without complaint and fails in its first forward; apply_method
    says why before any training, and prompt tuning still trains there."""
    import peft

    ids = torch.randint(3, VOCAB, (1, 5))
    wrapped = peft.get_peft_model(
        _tiny(model_type, **extra), peft.PrefixTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM")
    )
    with pytest.raises((ValueError, RuntimeError)):
        wrapped(input_ids=ids)  # the peer's own failure, unexplained
    with pytest.raises(InputError) as err:
        apply_method(_tiny(model_type, **extra), PeftConfig(method="prefix_tuning", num_virtual_tokens=2))
    assert err.value.field == "peft.method" and says in str(err.value) and "prompt_tuning" in str(err.value)
    model = apply_method(_tiny(model_type, **extra), PeftConfig(method="prompt_tuning", num_virtual_tokens=2))
    loss, _ = CausalLMLoss(model)(ids, torch.ones_like(ids), ids)
    loss.backward()
    assert model.prompt_encoder.default.embedding.weight.grad.abs().sum() > 0


def test_prefix_cache_problem_accepts_plain_and_sliding_window_attention():
    assert prefix_cache_problem(tiny_llama(VOCAB)) is None
    assert prefix_cache_problem(_tiny("gemma3_text", head_dim=8, sliding_window=4)) is None


def test_prefix_tuning_with_gradient_checkpointing_is_refused():
    """transformers replays checkpointed layers with past_key_values=None: the prefix would be
    gone. Refused when the method is applied (peft itself raises a ValueError there) and, if
    checkpointing is switched on afterwards, by the first training forward."""
    model = tiny_llama(VOCAB)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(InputError) as err:
        apply_method(model, PeftConfig(method="prefix_tuning", num_virtual_tokens=2))
    assert err.value.field == "train.gradient_checkpointing"
    model = apply_method(tiny_llama(VOCAB), PeftConfig(method="prefix_tuning", num_virtual_tokens=2)).train()
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(3, VOCAB, (1, 5))
    with pytest.raises(InputError) as err:
        CausalLMLoss(model)(ids, torch.ones_like(ids), ids)
    assert err.value.field == "train.gradient_checkpointing"


def test_every_prompt_learning_method_takes_both_tasks():
    for method in METHODS_UNDER_TEST:
        spec = METHODS[method]
        assert set(spec.tasks) == {"CAUSAL_LM", "SEQ_CLS"} and spec.virtual_tokens and not spec.merges
