"""PPO(-ptx), GRPO and RLOO end to end on a tiny model: the log-prob invariant, learning, resume,
the ptx term, LoRA's shared reference, reward sources and bad input.

The policy is a tiny random Llama (built from a config, real SmolLM2 tokenizer) after a short SFT
on "name a color" -> one of four colours, so it answers with a colour and <|im_end|>. The reward
"the response contains blue" starts near 1/4 and a policy can learn it in a few steps: the InstructGPT
pipeline (SFT, then RL) in miniature.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from instructkit.errors import InputError
from instructkit.train.engine import MetricsLog, StopTraining
from instructkit.train.ppo import ppo
from tests.tiny import real_tokenizer, tiny_model_dir, write_jsonl

COLORS = ["red", "blue", "green", "yellow"]
ASKS = ["name a color", "pick a color", "a color please", "which color?", "say a color", "color?"]


def contains_target(prompt: str, response: str, **data) -> float:
    """The reward function under test: 1 when the response names the record's target colour."""
    return float(data["target"] in response.lower())


def not_a_number(prompt: str, response: str, **data):
    return "high"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are too small to split across threads; on a shared 2-core machine two
    threads per op contend and run about ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory) -> Path:
    from instructkit.train.sft import sft

    root = tmp_path_factory.mktemp("ppo-sft")
    rng = random.Random(0)
    rows = [
        {
            "messages": [
                {"role": "user", "content": rng.choice(ASKS)},
                {"role": "assistant", "content": rng.choice(COLORS)},
            ]
        }
        for _ in range(64)
    ]
    write_jsonl(root / "colors.jsonl", rows)
    sft(
        {
            "model": str(tiny_model_dir(root / "tiny")),
            "out": str(root / "sft"),
            "data": {"path": str(root / "colors.jsonl"), "val_fraction": 0.0, "max_length": 64},
            "peft": {"method": "full"},
            "optim": {"lr": 2e-2, "scheduler": "constant"},
            "train": {"batch_size": 8, "max_steps": 30, "progress": False},
        }
    )
    return root / "sft"


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    return write_jsonl(
        tmp_path_factory.mktemp("prompts") / "prompts.jsonl", [{"prompt": a, "target": "blue"} for a in ASKS * 4]
    )


@pytest.fixture(scope="module")
def colors_data(sft_model) -> Path:
    return sft_model.parent / "colors.jsonl"


def config(model: Path, prompts: Path, out: Path, **over) -> dict:
    cfg = {
        "model": str(model),
        "out": str(out),
        "data": {"path": str(prompts)},
        "reward": {"function": "tests.train.test_ppo:contains_target"},
        "peft": {"method": "full"},
        "optim": {"lr": 3e-3, "scheduler": "constant"},
        "train": {"batch_size": 16, "max_steps": 16, "progress": False},
        "advantage": "gae",
        "rollout_batch_size": 16,
        "group_size": 1,
        "max_new_tokens": 4,
        "ppo_epochs": 2,
        "kl_coef": 0.05,
        "vf_coef": 0.5,
    }
    for key, value in over.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg.get(key, {}), **value}
        else:
            cfg[key] = value
    return cfg


def records(out: Path) -> list[dict]:
    return MetricsLog(out / "metrics.jsonl").read()


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


# ----------------------------------------------------------------------------------------------
# The invariant: the log-probs stored at sampling time are the training pass's log-probs


def _tiny_gpt2(vocab_size: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab_size,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=1,
            eos_token_id=2,
        )
    )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_rollout_logprobs_equal_the_training_forward_pass(sft_model, family):
    """Sampled with the KV cache (left-padded prompts of different lengths, responses of different
    lengths padded after their stop token), then recomputed by one full forward pass over
    prompt + response at the same temperature, whole and in trimmed row subsets: equal to 1e-5.

    Two families: Llama (rotary positions, shift-invariant, the SFT'd tiny model whose responses
    end with <|im_end|>) and GPT-2 (absolute positions, random: a large stop set varies the
    lengths). Controls show the comparison is sensitive: log-probs at temperature 1 differ, and
    for GPT-2 so does a forward pass with positions 0..T-1 that ignore the left padding."""
    from instructkit.data.templates import encode_prompt
    from instructkit.models.loading import load_model
    from instructkit.train.rollout import in_chunks, response_logprobs, sample

    tok = real_tokenizer()
    if family == "llama":
        model, stops = load_model(sft_model, device="cpu", dtype="fp32"), [tok.eos_token_id]
    else:
        model, stops = _tiny_gpt2(len(tok)).eval(), [tok.eos_token_id, *range(1000, 9000)]
    contents = ["color?", "name a color", "please, pick one color that you like for the wall of my room"]
    ids = [encode_prompt(tok, [{"role": "user", "content": c}]) for c in contents] * 4
    assert len({len(p) for p in ids}) == 3  # left padding in the batch
    for seed in range(20):  # a batch with responses that stop early and responses cut at the limit
        rollout = sample(
            model,
            ids,
            stop_ids=stops,
            pad_id=tok.pad_token_id,
            max_new_tokens=5,
            temperature=1.5,
            top_p=0.95,
            batch_size=12,
            seed=seed,
        )
        if len(set(rollout.lengths.tolist())) > 1 and rollout.ended.any() and not rollout.ended.all():
            break
    else:
        pytest.fail("no seed gave responses of different lengths")
    with torch.no_grad():
        whole = response_logprobs(model, rollout, temperature=1.5)
        at_one = response_logprobs(model, rollout, temperature=1.0)
    chunked = in_chunks(lambda b: response_logprobs(model, b, temperature=1.5), rollout, 2)
    assert (whole - rollout.logprobs).abs().max().item() < 1e-5
    assert (chunked - rollout.logprobs).abs().max().item() < 1e-5
    assert (rollout.logprobs[rollout.response_mask == 0] == 0).all()
    assert (at_one - rollout.logprobs).abs().max().item() > 1e-2

    if family == "gpt2":
        with torch.no_grad():
            plain = model(input_ids=rollout.query_responses, attention_mask=rollout.attention_mask).logits
        p = rollout.prompt_width
        logp = torch.log_softmax(plain[:, p - 1 : -1] / 1.5, -1).gather(2, rollout.responses[..., None]).squeeze(2)
        assert ((logp - rollout.logprobs) * rollout.response_mask).abs().max().item() > 1e-3


# ----------------------------------------------------------------------------------------------
# Learning


def test_ppo_raises_the_reward_with_bounded_kl_and_writes_the_run_folder(sft_model, prompts, tmp_path):
    """GAE with a value model started from the policy backbone and a fresh head. The reward starts
    near the SFT policy's share of "blue" (about 1/4) and must rise by at least 0.35, while the KL to
    the SFT reference stays below 3 nats per response."""
    out = tmp_path / "gae"
    summary = ppo(config(sft_model, prompts, out))
    rows = records(out)
    assert [r["step"] for r in rows] == list(range(1, 17))
    first, last = mean(r["reward_mean"] for r in rows[:3]), mean(r["reward_mean"] for r in rows[-3:])
    print("ppo reward curve", [round(r["reward_mean"], 3) for r in rows])
    assert first < 0.5
    assert last >= first + 0.35
    assert max(r["kl"] for r in rows) < 3.0
    keys = {
        "step",
        "loss",
        "lr",
        "tokens_per_s",
        "reward_mean",
        "kl",
        "kl_coef",
        "entropy",
        "clip_frac",
        "value_loss",
        "policy_loss",
        "response_length",
        "generate_seconds",
        "train_seconds",
    }
    assert keys <= set(rows[0])
    for name in ("config.yaml", "summary.json", "final/config.json", "final/model.safetensors"):
        assert (out / name).is_file(), name
    assert summary["steps"] == 16 and summary["advantage"] == "gae"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "final")


def test_diagnostics_add_up_and_the_report_draws_them(sft_model, prompts, tmp_path):
    """Every step logs the score apart from the KL-penalised reward (their difference is the KL
    penalty paid, kl_coef x the mean summed KL), the value model's explained variance, advantage
    and return statistics, clip fractions and the time split; the report has a panel for each."""
    from instructkit.report import panels_of

    out = tmp_path / "diag"
    ppo(config(sft_model, prompts, out, train={"max_steps": 3}, adaptive_kl={"target": 1.0, "horizon": 100}))
    rows = records(out)
    for r in rows:
        assert r["penalized_reward_mean"] == pytest.approx(r["score_mean"] - r["kl_penalty"], abs=1e-5)
        assert r["kl_penalty"] == pytest.approx(r["kl_coef"] * r["kl"], rel=1e-5, abs=1e-7)
        assert r["score_mean"] == pytest.approx(r["reward_mean"])  # no missing-EOS penalty here
        assert r["explained_variance"] <= 1.0 and r["advantage_std"] > 0 and r["kl_target"] == 1.0
    # the value head starts at zero: the first step's values are 0, so nothing is explained
    assert rows[0]["value_mean"] == 0.0 and rows[0]["explained_variance"] == pytest.approx(0.0, abs=1e-6)
    assert rows[0]["return_mean"] == pytest.approx(rows[0]["advantage_mean"], abs=1e-6)  # A = R - V, V = 0
    drawn = {k for _, keys in panels_of(rows) for k in keys}
    diagnostics = {"score_mean", "penalized_reward_mean", "explained_variance", "advantage_mean", "return_mean"}
    assert diagnostics | {"clip_frac", "value_clip_frac", "generate_seconds", "kl_target"} <= drawn


def test_critic_warm_up_trains_the_value_model_alone(sft_model, prompts, tmp_path):
    from instructkit.models.loading import load_model

    out = tmp_path / "warm"
    ppo(config(sft_model, prompts, out, train={"max_steps": 2}, critic_warmup_steps=2))
    rows = records(out)
    before = load_model(str(sft_model), device="cpu", dtype="fp32").state_dict()
    after = load_model(str(out / "final"), device="cpu", dtype="fp32").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the policy did not move
    assert rows[0]["value_mean"] == 0.0 and rows[1]["value_mean"] != 0.0  # the value head did
    with pytest.raises(InputError, match="critic_warmup_steps"):
        ppo(config(sft_model, prompts, tmp_path / "g", advantage="grpo", group_size=2, critic_warmup_steps=1))


def test_grpo_raises_the_reward_without_a_value_model(sft_model, prompts, tmp_path):
    """4 prompts x 4 samples per step, advantages relative to each prompt's group."""
    out = tmp_path / "grpo"
    ppo(config(sft_model, prompts, out, advantage="grpo", rollout_batch_size=4, group_size=4))
    rows = records(out)
    first, last = mean(r["reward_mean"] for r in rows[:3]), mean(r["reward_mean"] for r in rows[-3:])
    print("grpo reward curve", [round(r["reward_mean"], 3) for r in rows])
    assert first < 0.5
    assert last >= first + 0.35
    assert max(r["kl"] for r in rows) < 3.0
    assert "value_loss" not in rows[0]
    assert "explained_variance" not in rows[0] and "return_mean" not in rows[0]  # no value model, no returns
    assert all(r["penalized_reward_mean"] == pytest.approx(r["score_mean"] - r["kl_penalty"], abs=1e-5) for r in rows)
    names = _safetensor_names(out / "checkpoints" / "step-000016" / "trainable.safetensors")
    assert names and all(n.startswith("policy.") for n in names)  # no value model trained or saved


def _safetensor_names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


# ----------------------------------------------------------------------------------------------
# Resume


def test_interrupted_run_resumes_exactly(sft_model, prompts, tmp_path):
    """Crash after step 3 (checkpoints every 2 steps), restart: the curve equals the uninterrupted
    one. The checkpoint must carry the policy and value weights, the optimizer, the adaptive KL
    coefficient, the running score statistics and the EMA weights; rollouts and shuffles are functions of (seed, step)."""
    over = dict(
        train={"max_steps": 4, "save_every": 2},
        adaptive_kl={"target": 0.05, "horizon": 64},
        ema_decay=0.5,
        normalize_rewards=True,
    )
    ppo(config(sft_model, prompts, tmp_path / "full", **over))

    def crash(step: int) -> None:
        if step == 3:
            raise StopTraining("simulated crash")

    with pytest.raises(StopTraining):
        ppo(config(sft_model, prompts, tmp_path / "cut", **over), on_step=crash)
    assert not (tmp_path / "cut" / "final").exists()
    ppo(config(sft_model, prompts, tmp_path / "cut", **over))
    full, cut = records(tmp_path / "full"), records(tmp_path / "cut")
    assert [r["step"] for r in cut] == [1, 2, 3, 4]
    keys = ("loss", "reward_mean", "score_mean", "kl", "kl_coef", "value_loss", "policy_loss", "clip_frac")
    assert [[r[k] for k in keys] for r in full] == [[r[k] for k in keys] for r in cut]
    assert full[-1]["kl_coef"] != 0.05  # the adaptive coefficient moved, so its state mattered
    assert abs(full[0]["score_mean"]) < 1e-6 < abs(full[0]["reward_mean"])  # step 1: its own moments

    # Ctrl-C during step 2: the step finishes, is checkpointed, and the run stops; it resumes too.
    import signal

    def interrupt(step: int) -> None:
        if step == 1:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        ppo(config(sft_model, prompts, tmp_path / "sig", **over), on_step=interrupt)
    assert (tmp_path / "sig" / "checkpoints" / "step-000002").is_dir()
    assert len(records(tmp_path / "sig")) == 2 and not (tmp_path / "sig" / "final").exists()
    ppo(config(sft_model, prompts, tmp_path / "sig", **over))
    assert [[r[k] for k in keys] for r in records(tmp_path / "sig")] == [[r[k] for k in keys] for r in full]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # final/ holds the EMA weights, restored exactly


# ----------------------------------------------------------------------------------------------
# PPO-ptx


def test_ptx_term_keeps_the_language_model_loss_down(sft_model, prompts, colors_data, tmp_path):
    """InstructGPT Eq. 2's gamma term on the SFT demonstrations. Chasing "blue" raises the LM loss on
    the demonstrations (the other colours lose probability: the alignment tax); with ptx_coef = 1 the
    final policy's loss on them is lower than with ptx_coef = 0, same seed and rollouts' start."""
    from instructkit.data.collate import pad_batch
    from instructkit.data.encoders import encode_records
    from instructkit.data.formats import load_records
    from instructkit.models.lm import CausalLMLoss
    from instructkit.models.loading import load_model

    over = dict(train={"max_steps": 8}, data={"ptx_path": str(colors_data), "ptx_batch_size": 16})
    ppo(config(sft_model, prompts, tmp_path / "ptx0", ptx_coef=0.0, **over))
    ppo(config(sft_model, prompts, tmp_path / "ptx1", ptx_coef=1.0, **over))
    assert "ptx_loss" in records(tmp_path / "ptx0")[0]  # measured even when it does not train

    tok = real_tokenizer()
    examples, _ = encode_records(
        tok, load_records(str(colors_data)).records, template=None, max_length=64, where="colors"
    )
    batch = pad_batch(examples, pad_id=tok.pad_token_id)

    def lm_loss(model_dir: Path) -> float:
        with torch.no_grad():
            total, count = CausalLMLoss(load_model(model_dir, device="cpu", dtype="fp32"))(**batch)
        return float(total / count)

    start, without, with_ptx = lm_loss(sft_model), lm_loss(tmp_path / "ptx0"), lm_loss(tmp_path / "ptx1")
    print("ptx: LM loss sft", start, "ptx_coef 0", without, "ptx_coef 1", with_ptx)
    assert without > start  # the tax exists
    assert with_ptx < without - 0.05


# ----------------------------------------------------------------------------------------------
# LoRA: the reference is the policy with its adapter off


def test_lora_reference_is_the_policy_with_the_adapter_off(sft_model, prompts, tmp_path):
    """No second copy of the weights: the reference holds no model of its own and every parameter
    of the policy + reference is the base's or the adapter's. Reference log-probs equal the plain
    base model's, while the policy (adapter on, perturbed away from its zero init) differs."""
    from instructkit.config import PPOConfig, load_config
    from instructkit.models.loading import load_model
    from instructkit.models.peft_methods import count_parameters
    from instructkit.train.ppo import build_models
    from instructkit.train.rollout import response_logprobs, sample

    tok = real_tokenizer()
    cfg = load_config(
        PPOConfig,
        None,
        base=config(
            sft_model,
            prompts,
            tmp_path / "x",
            advantage="grpo",
            group_size=2,
            peft={"method": "lora", "r": 4, "alpha": 8},
        ),
    )
    models = build_models(cfg, tok, with_value=False, device="cpu")
    base = load_model(sft_model, device="cpu", dtype="fp32")
    _, base_total = count_parameters(base)
    trainable, total = count_parameters(models.policy)
    assert models.reference.model is None and models.reference.policy is models.policy
    assert total == base_total + trainable  # base weights once, plus the adapter
    with torch.no_grad():
        for name, p in models.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    from instructkit.data.templates import encode_prompt

    ids = [encode_prompt(tok, [{"role": "user", "content": c}]) for c in ("color?", "pick a color")] * 2
    rollout = sample(base, ids, stop_ids=[2], pad_id=2, max_new_tokens=4, temperature=1.0, seed=0)
    with torch.no_grad():
        ref = models.reference.logprobs(rollout, 1.0, 1024)
        plain = response_logprobs(base, rollout, 1.0)
        policy = response_logprobs(models.policy, rollout, 1.0)
    assert (ref - plain).abs().max().item() < 1e-5
    assert (policy - plain).abs().max().item() > 1e-2


@pytest.mark.parametrize("advantage", ["rloo", "gae"])
def test_lora_run_saves_an_adapter(sft_model, prompts, tmp_path, advantage):
    """LoRA on the policy (and, for GAE, on the value model's backbone, its head trained), the k3
    estimator (never negative, so the logged KL is not either), reward whitening and the
    missing-EOS penalty, for two steps."""
    out = tmp_path / "lora"
    group = 4 if advantage == "rloo" else 1
    summary = ppo(
        config(
            sft_model,
            prompts,
            out,
            advantage=advantage,
            rollout_batch_size=16 // group,
            group_size=group,
            peft={"method": "lora", "r": 4, "alpha": 8},
            train={"max_steps": 2},
            kl_estimator="k3",
            whiten_rewards=True,
            missing_eos_penalty=1.0,
        )
    )
    rows = records(out)
    assert len(rows) == 2 and rows[1]["kl"] >= 0.0 and ("value_loss" in rows[0]) == (advantage == "gae")
    names = _safetensor_names(out / "checkpoints" / "step-000002" / "trainable.safetensors")
    assert all("lora_" in n or ".score." in n for n in names)
    assert any(n.startswith("value.") and ".score." in n for n in names) == (advantage == "gae")
    assert (out / "final" / "adapter_config.json").is_file()
    assert summary["trainable_parameters"] < summary["total_parameters"] / 2
    from instructkit.models.loading import load_model

    assert hasattr(load_model(out, device="cpu"), "peft_config")


# ----------------------------------------------------------------------------------------------
# Reward model as the reward source and the value model's start


def test_reward_model_scores_and_starts_the_value_model(sft_model, prompts, tmp_path):
    """A reward-model folder (the SFT backbone + a scalar head, as `instructkit rm` writes it)
    scores the responses, re-tokenised with its own tokenizer; the value model starts as a copy
    of it (same head weights), separate from the scorer."""
    from instructkit.config import PPOConfig, load_config
    from instructkit.data.prompts import PromptRecord
    from instructkit.models.loading import load_model, load_tokenizer
    from instructkit.models.reward_model import reward_model_from_causal_lm
    from instructkit.train.ppo import ModelReward, build_models

    rm_dir = tmp_path / "rm"
    rm_tok = load_tokenizer(sft_model)
    rm = reward_model_from_causal_lm(load_model(sft_model, device="cpu", dtype="fp32"), rm_tok)
    rm.save_pretrained(rm_dir, safe_serialization=True)
    rm_tok.save_pretrained(rm_dir)

    cfg = load_config(
        PPOConfig,
        None,
        base=config(
            sft_model,
            prompts,
            tmp_path / "run",
            reward={"function": None, "model": str(rm_dir)},
            train={"max_steps": 2},
        ),
    )
    models = build_models(cfg, real_tokenizer(), with_value=True, device="cpu")
    assert torch.equal(models.value.score.weight, rm.score.weight)
    assert models.value.score.weight.requires_grad

    scorer = ModelReward(str(rm_dir), None, 4, "cpu")
    from instructkit.data.schema import Message

    p = PromptRecord([Message("user", "name a color")], "name a color")
    a, b = scorer([p, p], ["blue", "red"])
    assert a != b
    summary = ppo(cfg)
    rows = records(tmp_path / "run")
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["reward_mean"])) for r in rows)
    assert summary["steps"] == 2


def test_value_model_from_the_policy_starts_at_zero_with_the_policy_backbone(sft_model):
    """Without a reward model, the value model is the policy's backbone and a zero head: every
    first value is exactly 0 (so the first GAE advantages are the returns, not head noise),
    while the head's gradient (the hidden state) is not zero, so it learns."""
    from instructkit.models.loading import load_model
    from instructkit.train.ppo import value_model_from_policy

    policy = load_model(sft_model, device="cpu", dtype="fp32")
    value = value_model_from_policy(policy)
    assert torch.equal(value.model.embed_tokens.weight, policy.model.embed_tokens.weight)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    scores = value(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.equal(scores, torch.zeros_like(scores))
    scores.sum().backward()
    assert value.score.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# Bad input fails before training, naming the place


def test_bad_prompt_record_names_file_line_and_field(sft_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": [{"role": "bot", "content": "x"}]}) + "\n"
    )
    with pytest.raises(InputError) as err:
        ppo(config(sft_model, bad, tmp_path / "run"))
    assert err.value.line == 2 and err.value.field == "prompt[0].role"
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"promt": "hi"}])
    with pytest.raises(InputError, match="missing field 'prompt'.*did you mean 'promt'"):
        ppo(config(sft_model, missing, tmp_path / "run2"))


@pytest.mark.parametrize(
    "over, field",
    [
        ({"advantage": "grop"}, "advantage"),
        ({"advantage": "grpo", "group_size": 1}, "group_size"),
        ({"kl_estimator": "k2"}, "kl_estimator"),
        ({"rollout_batch_size": 3}, "train.batch_size"),
        ({"reward": {"function": None}}, "reward"),
        ({"train": {"eval_every": 5}}, "train.eval_every"),
    ],
)
def test_bad_config_is_refused_before_any_model_loads(sft_model, prompts, tmp_path, over, field):
    with pytest.raises(InputError) as err:
        ppo(config(sft_model, prompts, tmp_path / "run", **over))
    assert err.value.field == field


def test_reward_function_must_return_a_number(sft_model, prompts, tmp_path):
    with pytest.raises(InputError, match="not a finite number"):
        ppo(
            config(
                sft_model,
                prompts,
                tmp_path / "run",
                reward={"function": "tests.train.test_ppo:not_a_number"},
                train={"max_steps": 1},
            )
        )


def test_unknown_reward_function_is_refused_before_any_model_loads(sft_model, prompts, tmp_path):
    with pytest.raises(InputError, match="contains_targt.*did you mean 'contains_target'"):
        ppo(config(sft_model, prompts, tmp_path / "run", reward={"function": "tests.train.test_ppo:contains_targt"}))
    assert not (tmp_path / "run" / "checkpoints").exists()
