"""PPO(-ptx), GRPO and RLOO recipe: prompts and a reward in, a policy that earns more reward out.

InstructGPT's third step (Ouyang et al. 2022, Eq. 2): maximise
``E[r(x, y) - beta * log(pi(y|x) / pi_SFT(y|x))] + gamma * E_pretrain[log pi(x)]`` with PPO. Each
step samples responses, scores them, turns scores into per-token advantages with the estimator
named in the config (:data:`instructkit.losses.rl.ADVANTAGE_ESTIMATORS`: GAE with a value model,
or group-relative GRPO / RLOO without one), then takes a few clipped-PPO epochs over the batch.

What this module owns is that step (:func:`ppo_step`) and the models it needs. The loop around
the steps (checkpoints with the EMA and KL-controller state, resume, the stop signal, metrics,
progress) is the engine's :class:`~instructkit.train.engine.TrainingLoop`; the run folder and the
final save are :mod:`instructkit.train.setup`'s. Sampling and log-prob recomputation live in
:mod:`instructkit.train.rollout`; the math in :mod:`instructkit.losses.rl`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from instructkit.config import PPOConfig
from instructkit.data.prompts import PromptRecord, encode_prompts, read_prompts
from instructkit.data.schema import Message
from instructkit.errors import InputError
from instructkit.losses import rl
from instructkit.stages import resolve_stage_config
from instructkit.train import engine, setup

# ----------------------------------------------------------------------------------------------
# Reward sources


class FunctionReward:
    """A Python reward: ``fn(prompt: str, response: str, **data) -> float`` per response."""

    def __init__(self, fn: Callable[..., Any], name: str) -> None:
        self.fn, self.name = fn, name

    def __call__(self, prompts: Sequence[PromptRecord], responses: Sequence[str]) -> list[float]:
        out = []
        for prompt, response in zip(prompts, responses):
            value = self.fn(prompt.text, response, **prompt.data)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(
                    f"reward function {self.name} returned {value!r}, not a finite number", field="reward.function"
                )
            out.append(float(value))
        return out


class ModelReward:
    """A reward model (an ``instructkit rm`` output): each (prompt, response) re-tokenised with the
    reward model's own tokenizer and chat template, scored at its last token, shifted by its bias."""

    def __init__(self, spec: str, template: str | None, batch_size: int, device) -> None:
        from instructkit.models.reward_model import load_reward_model

        self.model, self.tokenizer, self.bias = load_reward_model(spec, device=str(device))
        self.model.requires_grad_(False)
        self.template, self.batch_size = template, batch_size

    def __call__(self, prompts: Sequence[PromptRecord], responses: Sequence[str]) -> list[float]:
        from instructkit.models.reward_model import score

        return score(
            self.model,
            self.tokenizer,
            [p.messages for p in prompts],
            [[Message("assistant", r)] for r in responses],
            bias=self.bias,
            batch_size=self.batch_size,
            template=self.template,
        )


# ----------------------------------------------------------------------------------------------
# Models: reference and value


class Reference:
    """Log-probs under the frozen KL reference: the LoRA policy itself with its adapter disabled
    (no second copy), or a separate frozen model."""

    def __init__(self, policy: nn.Module, model: nn.Module | None) -> None:
        self.policy, self.model = policy, model

    def logprobs(self, batch, temperature: float, chunk_size: int) -> torch.Tensor:
        from instructkit.train.rollout import adapter_disabled, response_logprobs

        if self.model is not None:
            return response_logprobs(self.model, batch, temperature, chunk_size)
        with adapter_disabled(self.policy) as base:
            return response_logprobs(base, batch, temperature, chunk_size)


def value_model_from_policy(causal_lm: nn.Module) -> nn.Module:
    """A one-label sequence classifier (the reward-model architecture) with a copy of the
    policy's backbone weights and a scalar head that starts at zero. Unlike
    :func:`instructkit.models.reward_model.reward_model_from_causal_lm`, it leaves the tokenizer,
    the policy's config and the global random seed alone."""
    from transformers import AutoModelForSequenceClassification

    from instructkit.models.bottleneck import copy_adapters

    config = copy.deepcopy(causal_lm.config)
    config.num_labels = 1
    value = AutoModelForSequenceClassification.from_config(config, dtype=causal_lm.dtype)
    copy_adapters(causal_lm, value)  # the policy's bottleneck adapters, if it carries them
    prefix = value.base_model_prefix
    getattr(value, prefix).load_state_dict(getattr(causal_lm, prefix).state_dict())
    # Zero, not random: a random head's values are noise of the size of the rewards, and GAE
    # would turn that noise into the first advantages. From zero, the first advantages are the
    # (discounted) returns, and the head learns from there (its gradient is the hidden state).
    nn.init.zeros_(value.score.weight)
    return value


def value_model_from_reward_model(spec: str, tokenizer) -> nn.Module:
    """The reward model's weights as the value model's start (InstructGPT, Sec. 3.5). It reads the
    policy's token ids, so its vocabulary must extend the policy's."""
    from instructkit.models.reward_model import load_reward_model

    value, rm_tokenizer, _ = load_reward_model(spec, device="cpu")
    rm_vocab = rm_tokenizer.get_vocab()
    if any(rm_vocab.get(token) != i for token, i in tokenizer.get_vocab().items()):
        raise InputError(
            "the reward model's vocabulary differs from the policy's, so it cannot start the "
            "value model; use a reward model trained from the policy's family",
            field="reward.model",
        )
    return value


@dataclass
class Models:
    policy: nn.Module  # trains
    reference: Reference  # frozen KL reference
    value: nn.Module | None  # trains; None for estimators without a value model


def build_models(cfg: PPOConfig, tokenizer, *, with_value: bool, device) -> Models:
    """The policy (with ``cfg.peft`` applied), its KL reference and, if asked, the value model.

    An SFT adapter under ``cfg.model`` is merged first: it is both the start and the reference.
    Dropout is off everywhere: the log-probs of the sampling pass, of the reference and of the
    training pass must come from the same function. A LoRA/IA3 policy is its own reference
    (adapter disabled), so there is no second copy of the weights.
    """
    from instructkit.models.loading import load_model
    from instructkit.models.peft_methods import apply_method, is_peft

    base = load_model(
        cfg.model, dtype="fp32", device="cpu", trust_remote_code=cfg.trust_remote_code, merge_adapter=True
    )
    engine.set_dropout(base, 0.0)
    value = None
    if with_value:
        value = (
            value_model_from_reward_model(cfg.reward.model, tokenizer)
            if cfg.reward.model
            else value_model_from_policy(base)
        )
        engine.set_dropout(value, 0.0)
        value = apply_method(value, cfg.peft, task="SEQ_CLS").to(device)
    ref_model = None
    if cfg.ref_model:
        ref_model = load_model(
            cfg.ref_model, dtype="fp32", device="cpu", trust_remote_code=cfg.trust_remote_code, merge_adapter=True
        )
    if cfg.train.gradient_checkpointing:
        setup.enable_gradient_checkpointing(base)
    policy = apply_method(base, cfg.peft).to(device)
    if ref_model is None and not is_peft(policy):
        ref_model = copy.deepcopy(policy)  # full or partial fine-tuning: the initial weights, frozen
    if ref_model is not None:
        engine.set_dropout(ref_model, 0.0)
        ref_model.requires_grad_(False).eval().to(device)
    return Models(policy, Reference(policy, ref_model), value)


class PtxTerm:
    """InstructGPT Eq. 2's gamma term: ``ptx_coef`` times the token-mean LM loss of one batch of
    pre-training / SFT data per optimizer step. With ``ptx_coef`` 0 it is still measured, without
    a gradient: the alignment tax, visible in the log."""

    def __init__(
        self,
        loss_module: nn.Module,
        examples: list[dict[str, list[int]]],
        collate,
        batch_size: int,
        coef: float,
        seed: int,
    ) -> None:
        self.loss_module, self.examples, self.collate, self.coef = loss_module, examples, collate, coef
        self.plan = engine.StepPlan(len(examples), min(batch_size, len(examples)), seed + 1)

    def backward(self, update: int, device) -> float:
        """The LM loss of optimizer step ``update``'s batch; its scaled gradient is accumulated."""
        rows = [self.examples[i] for i in self.plan.indices(update)]
        batch = {k: v.to(device) for k, v in self.collate(rows).items()}
        with contextlib.nullcontext() if self.coef > 0 else torch.no_grad():
            total, count = self.loss_module(**batch)
            loss = total / count.clamp(min=1)
        if self.coef > 0:
            (self.coef * loss).backward()
        return float(loss.detach())


class _Trained(nn.Module):
    """The policy and the value model as one module, so one checkpoint holds both."""

    def __init__(self, policy: nn.Module, value: nn.Module | None) -> None:
        super().__init__()
        self.policy = policy
        if value is not None:
            self.value = value


class EMA:
    """An exponential moving average of the policy's trainable weights (``ema_decay``): final/
    holds it instead of the last weights. Checkpointed as the engine's extra state."""

    def __init__(self, policy: nn.Module, decay: float) -> None:
        self.decay = decay
        self.weights = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, policy: nn.Module) -> None:
        for n, p in policy.named_parameters():
            if n in self.weights:
                self.weights[n].lerp_(p.detach(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, policy: nn.Module) -> None:
        for n, p in policy.named_parameters():
            if n in self.weights:
                p.copy_(self.weights[n])

    def state_dict(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {}, self.weights

    def load_state_dict(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        for n, w in self.weights.items():
            w.copy_(tensors[n])


# ----------------------------------------------------------------------------------------------
# The recipe


def ppo(
    config: PPOConfig | str | Path | dict | None = None,
    overrides: list[str] | None = None,
    *,
    on_step: Callable[[int], None] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run PPO(-ptx) / GRPO / RLOO; returns the run summary (also written to summary.json)."""
    from instructkit.models.loading import load_tokenizer
    from instructkit.models.peft_methods import count_parameters, is_peft

    # 1. Resolve the config (PPOConfig checks the shapes and what PPO cannot use); look up the
    #    estimator and KL estimator; the prompts and the reward must be given.
    cfg = resolve_stage_config(PPOConfig, "ppo", config, overrides)
    estimator, kl_estimator = rl.ADVANTAGE_ESTIMATORS[cfg.advantage], rl.KL_ESTIMATORS[cfg.kl_estimator]
    _check_inputs(cfg)

    # 2. The run folder (a finished run with this config is returned as is). fp32 unless
    #    train.dtype asks otherwise, also on a GPU: a bf16-autocast run of the default model on an
    #    H100 produced NaN losses at step 5 (not yet diagnosed; see docs/ppo.md).
    stage = setup.open_run(
        cfg, stage="ppo", overwrite=overwrite, train=replace(cfg.train, dtype=cfg.train.dtype or "fp32")
    )
    if stage.finished:
        return stage.run.saved_summary()
    with stage.cleanup_on_failure():
        if stage.accelerator.num_processes > 1:
            raise InputError("PPO runs in one process (launch it without torchrun/accelerate launch)")
        device = stage.accelerator.device

        # 3. Prompts, ptx data and a reward function: read and validate before any model loads.
        inputs = read_inputs(cfg)

        # 4. Policy, reference (the LoRA policy with its adapter off, else a frozen copy), value
        #    model (from the reward model, else from the policy with a zero head), reward source.
        tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        engine.set_seed(cfg.train.seed)
        models = build_models(cfg, tokenizer, with_value=estimator.needs_value_model, device=device)
        reward = inputs.reward or ModelReward(cfg.reward.model, cfg.reward.template, cfg.reward.batch_size, device)
        parameters = setup.Trainable(tokenizer, models.policy, *count_parameters(models.policy))

        # 5. Prompts with the policy's chat template (+ generation prompt); ptx examples as SFT's.
        prompts, too_long = encode_ppo_prompts(cfg, tokenizer, inputs.prompts)
        ptx = build_ptx(cfg, tokenizer, models.policy, inputs.ptx_records)

        # 6. One optimizer over policy + value, its schedule, the KL controller and the EMA.
        parts = StepParts.build(
            cfg, models, reward, tokenizer, prompts, ptx, estimator, kl_estimator, autocast=stage.accelerator.autocast
        )

        # 7. The PPO steps, checkpointed with the EMA and KL state; resumes from the last checkpoint.
        steps, history, seconds = run_steps(parts, stage, on_step)

    # 8. Save final/ (the EMA weights when enabled) and the summary.
    if parts.ema is not None:
        parts.ema.copy_to(models.policy)
    last = history[-1] if history else {}
    summary = setup.stage_summary(
        "ppo",
        cfg,
        parameters,
        stage.run,
        advantage=cfg.advantage,
        steps=steps,
        reward_mean=last.get("reward_mean"),
        kl=last.get("kl"),
        kl_coef=parts.kl_ctl.value,
        generate_seconds=round(seconds["generate"], 2),
        train_seconds=round(seconds["train"], 2),
        wall_seconds=round(seconds["wall"], 2),
        prompts=len(prompts),
        dropped_too_long=too_long,
        ptx_examples=len(ptx.examples) if ptx is not None else 0,
        ema=cfg.ema_decay is not None,
    )
    merged = cfg.save_merged and is_peft(models.policy)
    return stage.finish(
        summary, lambda: setup.save_final(models.policy, tokenizer, stage.run, base_spec=cfg.model, merged=merged)
    )


# ----------------------------------------------------------------------------------------------
# Set-up steps


@dataclass
class Inputs:
    prompts: list[PromptRecord]
    ptx_records: list[Any] | None
    reward: FunctionReward | None  # None: cfg.reward.model scores, once it is loaded


def read_inputs(cfg: PPOConfig) -> Inputs:
    """The prompts, the ptx records and the reward function, each validated (a bad record or an
    unknown function is an InputError here, before any model loads)."""
    from instructkit.datasets import resolve_data_path
    from instructkit.rewards import load_reward_function

    prompts = read_prompts(resolve_data_path(cfg.data.path))[: cfg.data.limit or None]
    ptx_records = None
    if cfg.data.ptx_path:
        from instructkit.data.formats import load_records

        ptx_records = load_records(resolve_data_path(cfg.data.ptx_path), format=cfg.data.ptx_format).records
    reward = (
        FunctionReward(load_reward_function(cfg.reward.function), cfg.reward.function) if cfg.reward.function else None
    )
    return Inputs(prompts, ptx_records, reward)


def encode_ppo_prompts(cfg: PPOConfig, tokenizer, prompts: list[PromptRecord]) -> tuple[list[PromptRecord], int]:
    """The prompts that fit ``max_prompt_length``, rendered; and how many did not fit."""
    kept, too_long = encode_prompts(
        tokenizer, prompts, template=cfg.data.template, max_length=cfg.data.max_prompt_length
    )
    if len(kept) < cfg.rollout_batch_size:
        raise InputError(
            f"{len(kept)} usable prompts (after {too_long} too long for max_prompt_length="
            f"{cfg.data.max_prompt_length}) is fewer than rollout_batch_size {cfg.rollout_batch_size}",
            file=cfg.data.path,
        )
    return kept, too_long


def build_ptx(cfg: PPOConfig, tokenizer, policy: nn.Module, records: list[Any] | None) -> PtxTerm | None:
    """The ptx term over the encoded ptx records (assistant tokens train, as in SFT), if any."""
    from instructkit.data.collate import lm_collate
    from instructkit.data.encoders import encode_records
    from instructkit.models.lm import CausalLMLoss

    if records is None:
        return None
    examples, _ = encode_records(
        tokenizer, records, template=cfg.data.template, max_length=cfg.data.ptx_max_length, where=cfg.data.ptx_path
    )
    if not examples:
        raise InputError("no ptx example fits ptx_max_length", file=cfg.data.ptx_path)
    return PtxTerm(
        CausalLMLoss(policy, cfg.train.loss_chunk_size),
        examples,
        lm_collate(tokenizer.pad_token_id),
        cfg.data.ptx_batch_size,
        cfg.ptx_coef,
        cfg.train.seed,
    )


@dataclass
class StepParts:
    """Everything a PPO step reads or updates, built once."""

    cfg: PPOConfig
    models: Models
    trained: _Trained  # policy + value: the module whose trainable weights are checkpointed
    reward: Callable[[Sequence[PromptRecord], Sequence[str]], list[float]]
    tokenizer: Any
    prompts: list[PromptRecord]
    plan: engine.StepPlan  # over the prompts: which prompts each step samples from
    stop_ids: list[int]
    stop_strings: list[str]
    ptx: PtxTerm | None
    estimator: rl.AdvantageEstimator
    kl_estimator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    kl_ctl: rl.FixedKLController  # or its subclass AdaptiveKLController
    ema: EMA | None
    autocast: Callable[[], Any]
    moments: rl.RunningMoments | None = None  # normalize_rewards: the running score statistics

    @classmethod
    def build(
        cls,
        cfg: PPOConfig,
        models: Models,
        reward,
        tokenizer,
        prompts: list[PromptRecord],
        ptx: PtxTerm | None,
        estimator: rl.AdvantageEstimator,
        kl_estimator,
        *,
        autocast,
    ) -> StepParts:
        from instructkit.generation import stop_tokens

        trained = _Trained(models.policy, models.value)
        params, optimizer, scheduler = engine.optimizer_and_schedule(
            trained, cfg.optim, cfg.train.max_steps * _updates(cfg)
        )
        kl_ctl = (
            rl.AdaptiveKLController(cfg.kl_coef, cfg.adaptive_kl.target, cfg.adaptive_kl.horizon)
            if cfg.adaptive_kl.target is not None
            else rl.FixedKLController(cfg.kl_coef)
        )
        ema = EMA(models.policy, cfg.ema_decay) if cfg.ema_decay is not None else None
        stop_ids, stop_strings = stop_tokens(models.policy, tokenizer, None, cfg.data.template)
        return cls(
            cfg,
            models,
            trained,
            reward,
            tokenizer,
            prompts,
            engine.StepPlan(len(prompts), cfg.rollout_batch_size, cfg.train.seed),
            stop_ids,
            stop_strings,
            ptx,
            estimator,
            kl_estimator,
            params,
            optimizer,
            scheduler,
            kl_ctl,
            ema,
            autocast,
            moments=rl.RunningMoments() if cfg.normalize_rewards else None,
        )

    def extra_state(self) -> dict[str, engine.ExtraState]:
        """What a resume restores besides weights, optimizer and schedule (engine.ExtraState)."""
        extra: dict[str, engine.ExtraState] = {"kl_controller": engine.JSONState(self.kl_ctl)}
        if self.ema is not None:
            extra["ema"] = self.ema
        if self.moments is not None:
            extra["reward_moments"] = engine.JSONState(self.moments)
        return extra


def run_steps(
    parts: StepParts, stage: setup.StageRun, on_step: Callable[[int], None] | None
) -> tuple[int, list[dict[str, Any]], dict[str, float]]:
    """``train.max_steps`` PPO steps in the engine's loop, from the last checkpoint if there is one;
    returns the steps done, the logged records and the generate / train / wall seconds."""
    cfg = parts.cfg
    checkpointer = engine.Checkpointer(
        stage.run,
        stage.accelerator,
        model=parts.trained,
        optimizer=parts.optimizer,
        scheduler=parts.scheduler,
        keep=cfg.train.keep_checkpoints,
        extra_state=parts.extra_state(),
    )
    loop = engine.TrainingLoop(
        stage.run,
        stage.accelerator,
        cfg.train,
        checkpointer,
        total_steps=cfg.train.max_steps,
        desc="ppo",
        show={"reward_mean": ".3f", "kl": ".3f"},
        on_step=on_step,
    )
    loop.resume()
    step, started = loop.start_step, time.time()
    seconds = {"generate": 0.0, "train": 0.0}
    with loop:
        while step < cfg.train.max_steps:
            record = ppo_step(parts, step)
            step += 1
            seconds["generate"] += record["generate_seconds"]
            seconds["train"] += record["train_seconds"]
            loop.end_step(step, record, state={})
    return step, loop.history, {**seconds, "wall": time.time() - started}


# ----------------------------------------------------------------------------------------------
# One PPO step


def ppo_step(p: StepParts, step: int) -> dict[str, Any]:
    """PPO step ``step`` (counted from 0): sample, score, advantages, PPO epochs, then the KL
    coefficient and the EMA; returns the step's metrics line."""
    from instructkit.models.passes import eval_mode
    from instructkit.train.rollout import in_chunks, response_values

    cfg, policy, value = p.cfg, p.models.policy, p.models.value
    # a. Rollout: group_size responses per prompt, sampled with their log-probs.
    t0 = time.perf_counter()
    batch_prompts = [p.prompts[i] for i in p.plan.indices(step) for _ in range(cfg.group_size)]
    rollout, texts = _rollout(p, batch_prompts, step)
    generate_s = time.perf_counter() - t0

    # b. Score; responses cut at max_new_tokens may pay the missing-EOS penalty.
    t1 = time.perf_counter()
    device = rollout.query_responses.device
    raw_scores = torch.tensor(p.reward(batch_prompts, texts), dtype=torch.float32, device=device)
    scores = raw_scores.clone()
    if cfg.missing_eos_penalty is not None:
        scores[~rollout.ended] -= cfg.missing_eos_penalty
    if p.moments is not None:  # this step's scores join the running statistics, then are scaled
        p.moments.update(scores)
        scores = p.moments.normalize(scores)

    # c. Reference log-probs and old values, before any update.
    mask, chunk = rollout.response_mask, cfg.train.loss_chunk_size
    with eval_mode(policy), p.autocast():
        ref_logprobs = in_chunks(
            lambda b: p.models.reference.logprobs(b, cfg.temperature, chunk), rollout, cfg.train.batch_size
        )
        old_values = (
            in_chunks(lambda b: response_values(value, b), rollout, cfg.train.batch_size) if value is not None else None
        )

    # d. Rewards (score - beta * KL per token), advantages from the estimator, whitening.
    kl = p.kl_estimator(rollout.logprobs, ref_logprobs) * mask  # (N, R)
    rewards = rl.kl_penalized_rewards(scores, kl, mask, p.kl_ctl.value)
    if cfg.whiten_rewards:
        rewards = rl.masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = p.estimator.estimate(
        rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.lam, group_size=cfg.group_size
    )
    diagnostics = _diagnostics(p, scores, kl, rewards, advantages, returns, old_values, mask)
    if cfg.whiten_advantages:
        advantages = rl.masked_whiten(advantages, mask)

    # e. PPO epochs over shuffled mini-batches, one optimizer step each (the value model alone
    # during the critic warm-up).
    policy.train()
    stats = _update(p, step, rollout=rollout, advantages=advantages, returns=returns, old_values=old_values)
    train_s = time.perf_counter() - t1

    # f. The step's line; then adapt the KL coefficient (Ziegler et al.) and update the EMA.
    seq_kl = float(kl.sum(1).mean())
    record = {
        "step": step + 1,
        "loss": stats.pop("loss"),
        "lr": stats.pop("lr"),
        "tokens_per_s": float(mask.sum()) / max(generate_s + train_s, 1e-9),
        "reward_mean": float(raw_scores.mean()),
        "reward_std": float(raw_scores.std(unbiased=False)),
        "kl": seq_kl,
        "kl_coef": p.kl_ctl.value,
        "entropy": float(rl.masked_mean(rollout.entropy, mask)),
        "response_length": float(rollout.lengths.mean()),
        "eos_fraction": float(rollout.ended.float().mean()),
        **diagnostics,
        **stats,
        "generate_seconds": round(generate_s, 4),
        "train_seconds": round(train_s, 4),
    }
    p.kl_ctl.update(seq_kl, len(rollout))
    if p.ema is not None:
        p.ema.update(policy)
    return record


def _diagnostics(p: StepParts, scores, kl, rewards, advantages, returns, old_values, mask) -> dict[str, float]:
    """What a PPO step's numbers say before the update: the score the policy is trained on (after
    any missing-EOS penalty and reward normalisation), the KL penalty it pays (``kl_coef`` x the mean summed KL), their
    difference as the per-sequence sum of the per-token rewards, the advantages and (gae) the
    returns, before whitening, and, with a value model, how much of the returns' variance its
    predictions explain."""
    out = {
        "score_mean": float(scores.mean()),
        "kl_penalty": p.kl_ctl.value * float(kl.sum(1).mean()),
        "penalized_reward_mean": float(rl.masked_sum(rewards, mask, dim=1).mean()),
        "advantage_mean": float(rl.masked_mean(advantages, mask)),
        "advantage_std": float(rl.masked_var(advantages, mask, unbiased=False).sqrt()),
    }
    if returns is not None:  # gae's; the group-relative estimators have advantages only
        out["return_mean"] = float(rl.masked_mean(returns, mask))
        out["return_std"] = float(rl.masked_var(returns, mask, unbiased=False).sqrt())
    if old_values is not None:
        out["value_mean"] = float(rl.masked_mean(old_values, mask))
        out["explained_variance"] = rl.explained_variance(old_values, returns, mask)
    if p.cfg.adaptive_kl.target is not None:
        out["kl_target"] = float(p.cfg.adaptive_kl.target)
    return out


def _rollout(p: StepParts, batch_prompts: list[PromptRecord], step: int):
    """The sampled responses of one step (a Rollout) and their decoded texts."""
    from instructkit.generation import decode_response
    from instructkit.train.rollout import sample

    cfg = p.cfg
    with p.autocast():
        rollout = sample(
            p.models.policy,
            [q.ids for q in batch_prompts],
            stop_ids=p.stop_ids,
            pad_id=p.tokenizer.pad_token_id,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            batch_size=cfg.generation_batch_size,
            seed=_seed(cfg.train.seed, step),
        )
    texts = [
        decode_response(p.tokenizer, row[: int(n)].tolist(), p.stop_ids, p.stop_strings)
        for row, n in zip(rollout.responses, rollout.lengths)
    ]
    return rollout, texts


def _update(p: StepParts, step: int, *, rollout, advantages, returns, old_values) -> dict[str, float]:
    """``ppo_epochs`` passes over the rollout in shuffled mini-batches of ``batch_size x grad_accum``
    sequences; each mini-batch's loss is its token mean (exact over its micro-batches), plus
    ``ptx_coef`` times the LM loss of one ptx batch. Returns the step's mean statistics."""
    from instructkit.train.rollout import response_logprobs, response_values

    cfg, policy, value = p.cfg, p.models.policy, p.models.value
    n = len(rollout)
    mini = cfg.train.batch_size * cfg.train.grad_accum
    sums: dict[str, float] = {}
    updates = 0
    device = rollout.query_responses.device

    def add(name: str, x: float) -> None:
        sums[name] = sums.get(name, 0.0) + x

    warmup = step < cfg.critic_warmup_steps  # the value model learns the returns; the policy waits
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(cfg.train.seed, step) * 101 + epoch))
        for start in range(0, n, mini):
            idx = order[start : start + mini]
            denom = rollout.response_mask[idx].sum().clamp(min=1)
            add("lr", p.scheduler.get_last_lr()[0])
            for micro in idx.split(cfg.train.batch_size):
                b = rollout.select(micro)
                w, rows = b.width, micro.to(device)
                share = float(b.response_mask.sum() / denom)
                with p.autocast():
                    logprobs = response_logprobs(policy, b, cfg.temperature, cfg.train.loss_chunk_size)
                    pg_loss, clip_frac = rl.clipped_policy_loss(
                        logprobs, b.logprobs, advantages[rows, :w], b.response_mask, cfg.clip_range, normalizer=denom
                    )
                    loss = None if warmup else pg_loss  # no policy gradient at all: its weights stay
                    if value is not None:
                        values = response_values(value, b)
                        vf_loss, vf_clip = rl.clipped_value_loss(
                            values,
                            old_values[rows, :w],
                            returns[rows, :w],
                            b.response_mask,
                            cfg.value_clip_range,
                            normalizer=denom,
                        )
                        loss = cfg.vf_coef * vf_loss if loss is None else loss + cfg.vf_coef * vf_loss
                        add("value_loss", float(vf_loss.detach()))
                        add("value_clip_frac", float(vf_clip) * share)
                loss.backward()
                add("policy_loss", float(pg_loss.detach()))
                add("clip_frac", float(clip_frac) * share)
                approx_kl = 0.5 * rl.masked_sum((logprobs.detach() - b.logprobs) ** 2, b.response_mask) / denom
                add("approx_kl", float(approx_kl))
                add("loss", float(loss.detach()))
            if p.ptx is not None and not warmup:
                with p.autocast():
                    ptx_loss = p.ptx.backward(step * _updates(cfg) + updates, device)
                add("ptx_loss", ptx_loss)
                add("loss", cfg.ptx_coef * ptx_loss)
            grad_norm = engine.optimizer_step(p.optimizer, p.scheduler, p.params, cfg.optim.max_grad_norm)
            if grad_norm is not None:
                add("grad_norm", grad_norm)
            updates += 1
    return {k: v / updates for k, v in sums.items()}


# ----------------------------------------------------------------------------------------------
# Small helpers


def _seed(seed: int, step: int) -> int:
    """The seed of one PPO step's sampling and shuffling: a function of (seed, step) only."""
    return (seed * 1_000_003 + step) % (2**31 - 1)


def _updates(cfg: PPOConfig) -> int:
    """Optimizer steps per PPO step."""
    return cfg.ppo_epochs * (cfg.rollout_batch_size * cfg.group_size) // (cfg.train.batch_size * cfg.train.grad_accum)


def _check_inputs(cfg: PPOConfig) -> None:
    """The two things a PPO config must name (the rest PPOConfig checks when it loads)."""
    if not cfg.data.path:
        raise InputError("no prompts: set data.path", field="data.path")
    if not cfg.reward.model and not cfg.reward.function:
        raise InputError(
            "no reward: set reward.model (a reward-model folder) or reward.function (module:function)", field="reward"
        )
