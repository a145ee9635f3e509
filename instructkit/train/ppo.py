"""PPO(-ptx), GRPO and RLOO recipe: prompts and a reward in, a policy that earns more reward out.

InstructGPT's third step (Ouyang et al. 2022, Eq. 2): maximise
``E[r(x, y) - beta * log(pi(y|x) / pi_SFT(y|x))] + gamma * E_pretrain[log pi(x)]`` with PPO. Each
step samples responses, scores them, turns scores into per-token advantages with the estimator
named in the config (:data:`instructkit.losses.rl.ADVANTAGE_ESTIMATORS`: GAE with a value model,
or group-relative GRPO / RLOO without one), then takes a few clipped-PPO epochs over the batch.

The engine's ``fit`` loop has no place for a rollout phase, so the loop is written here from the
engine's pieces (run folder, metrics, optimizer and schedule, atomic checkpoints, seeding).
Sampling and log-prob recomputation live in :mod:`instructkit.train.rollout`; the math in
:mod:`instructkit.losses.rl`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from instructkit.config import PPOConfig, resolve_stage_config
from instructkit.data.schema import ROLES, Message
from instructkit.errors import InputError, did_you_mean

# ----------------------------------------------------------------------------------------------
# Prompts


@dataclass
class PromptRecord:
    """One prompt: its messages, the text a reward function sees, and the record's other fields."""

    messages: list[Message]
    text: str  # the `prompt` string, or the last user turn of a message list
    data: dict[str, Any] = field(default_factory=dict)  # every other field, passed to reward functions
    ids: list[int] = field(default_factory=list)  # rendered with the chat template + generation prompt


def read_prompts(path: str) -> list[PromptRecord]:
    """Records with ``prompt`` (a string, or a list of {role, content} messages ending with a user
    turn) plus any other fields. Bad records raise an InputError naming file, line and field."""
    from instructkit.data.readers import read_rows

    records = []
    for row in read_rows(path):
        if "prompt" not in row.data or row.data["prompt"] in (None, ""):
            raise row.error("missing field 'prompt'" + did_you_mean("prompt", row.data), field="prompt")
        value = row.data["prompt"]
        if isinstance(value, str):
            messages = [Message("user", value)]
        elif isinstance(value, list) and value:
            messages = []
            for i, item in enumerate(value):
                where = f"prompt[{i}]"
                if not isinstance(item, dict) or not isinstance(item.get("content"), str):
                    raise row.error("expected a message object with 'role' and string 'content'", field=where)
                if item.get("role") not in ROLES:
                    raise row.error(f"unknown role {item.get('role')!r} (expected one of {', '.join(ROLES)})",
                                    field=f"{where}.role")
                messages.append(Message(item["role"], item["content"]))
            if messages[-1].role not in ("user", "tool"):
                raise row.error(f"the prompt must end with a user turn, not {messages[-1].role}", field="prompt")
        else:
            raise row.error("expected a string or a non-empty list of messages", field="prompt")
        text = value if isinstance(value, str) else \
            next((m.content for m in reversed(messages) if m.role == "user"), messages[-1].content)
        records.append(PromptRecord(messages, text, {k: v for k, v in row.data.items() if k != "prompt"}))
    return records


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
                raise InputError(f"reward function {self.name} returned {value!r}, not a finite number",
                                 field="reward.function")
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

        return score(self.model, self.tokenizer, [p.messages for p in prompts],
                     [[Message("assistant", r)] for r in responses], bias=self.bias,
                     batch_size=self.batch_size, template=self.template)


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

    config = copy.deepcopy(causal_lm.config)
    config.num_labels = 1
    value = AutoModelForSequenceClassification.from_config(config, dtype=causal_lm.dtype)
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
        raise InputError("the reward model's vocabulary differs from the policy's, so it cannot start the "
                         "value model; use a reward model trained from the policy's family",
                         field="reward.model")
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
    from instructkit.train.engine import set_dropout

    base = load_model(cfg.model, dtype="fp32", device="cpu", trust_remote_code=cfg.trust_remote_code,
                      merge_adapter=True)
    set_dropout(base, 0.0)
    value = None
    if with_value:
        value = (value_model_from_reward_model(cfg.reward.model, tokenizer) if cfg.reward.model
                 else value_model_from_policy(base))
        set_dropout(value, 0.0)
        value = apply_method(value, cfg.peft, task="SEQ_CLS").to(device)
    ref_model = None
    if cfg.ref_model:
        ref_model = load_model(cfg.ref_model, dtype="fp32", device="cpu", trust_remote_code=cfg.trust_remote_code,
                               merge_adapter=True)
    if cfg.train.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    policy = apply_method(base, cfg.peft).to(device)
    if ref_model is None and not is_peft(policy):
        ref_model = copy.deepcopy(policy)  # full or partial fine-tuning: the initial weights, frozen
    if ref_model is not None:
        set_dropout(ref_model, 0.0)
        ref_model.requires_grad_(False).eval().to(device)
    return Models(policy, Reference(policy, ref_model), value)


class PtxTerm:
    """InstructGPT Eq. 2's gamma term: ``ptx_coef`` times the token-mean LM loss of one batch of
    pre-training / SFT data per optimizer step. With ``ptx_coef`` 0 it is still measured, without
    a gradient: the alignment tax, visible in the log."""

    def __init__(self, loss_module: nn.Module, examples: list[dict[str, list[int]]], collate, batch_size: int,
                 coef: float, seed: int) -> None:
        from instructkit.train.engine import StepPlan

        self.loss_module, self.examples, self.collate, self.coef = loss_module, examples, collate, coef
        self.plan = StepPlan(len(examples), min(batch_size, len(examples)), seed + 1)

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


# ----------------------------------------------------------------------------------------------
# Checkpoints at PPO-step boundaries


def _save_checkpoint(path: Path, *, trained: nn.Module, optimizer, scheduler, state: dict[str, Any],
                     ema: dict[str, torch.Tensor] | None) -> None:
    """Trainable policy + value weights, optimizer, schedule, RNG, loop state (step, KL
    coefficient) and EMA weights, atomically."""
    from safetensors.torch import save_file

    from instructkit.train import engine

    with engine.atomic_dir(path) as tmp:
        save_file(engine.trainable_state(trained), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(engine.rng_state(), tmp / "rng-0.pt")
        if ema is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
        engine.atomic_write_json(tmp / "state.json", {**state, "world_size": 1})


def _load_checkpoint(path: Path, *, trained: nn.Module, optimizer, scheduler,
                     ema: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    from safetensors.torch import load_file

    from instructkit.train import engine

    state = engine.load_checkpoint(path, model=trained, optimizer=optimizer, scheduler=scheduler)
    if ema is not None:
        if not (path / "ema.safetensors").is_file():
            raise InputError("the checkpoint has no EMA weights but ema_decay is set", file=str(path))
        for k, v in load_file(str(path / "ema.safetensors")).items():
            ema[k].copy_(v)
    return state


# ----------------------------------------------------------------------------------------------
# The recipe


def ppo(config: PPOConfig | str | Path | dict | None = None, overrides: list[str] | None = None, *,
        on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run PPO(-ptx) / GRPO / RLOO; returns the run summary (also written to summary.json)."""
    from instructkit.datasets import resolve_data_path
    from instructkit.generation import decode_response, stop_tokens
    from instructkit.losses import rl
    from instructkit.models.lm import CausalLMLoss
    from instructkit.models.loading import load_tokenizer
    from instructkit.models.peft_methods import count_parameters, is_peft
    from instructkit.rewards import load_reward_function
    from instructkit.train import engine
    from instructkit.train.rollout import in_chunks, response_values, sample
    from instructkit.train.sft import encode_records, make_collate, save_final

    # 1. Resolve the config; look up the estimator and KL estimator; check what PPO cannot use.
    cfg = resolve_stage_config(PPOConfig, "ppo", config, overrides)
    estimator = _lookup(rl.ADVANTAGE_ESTIMATORS, cfg.advantage, "advantage")
    kl_estimator = _lookup(rl.KL_ESTIMATORS, cfg.kl_estimator, "kl_estimator")
    _check(cfg, estimator)
    run = engine.RunDir(Path(cfg.out))
    # fp32 unless train.dtype asks otherwise, also on a GPU: a bf16-autocast run of the default
    # model on an H100 produced NaN losses at step 5 (not yet diagnosed; see docs/ppo.md).
    accelerator = engine.make_accelerator(replace(cfg.train, dtype=cfg.train.dtype or "fp32"))
    if accelerator.num_processes > 1:
        raise InputError("PPO runs in one process (launch it without torchrun/accelerate launch)")
    device = accelerator.device
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_config(cfg)

    # 2. Prompts and ptx data: read and validate before any model loads.
    prompts = read_prompts(resolve_data_path(cfg.data.path))[: cfg.data.limit or None]
    ptx_records = None
    if cfg.data.ptx_path:
        from instructkit.data.formats import load_records

        ptx_records = load_records(resolve_data_path(cfg.data.ptx_path), format=cfg.data.ptx_format).records
    reward = FunctionReward(load_reward_function(cfg.reward.function), cfg.reward.function) \
        if cfg.reward.function else None

    # 3. Policy, reference (the LoRA policy with its adapter off, else a frozen copy), value
    #    model (from the reward model, else from the policy with a fresh head), reward source.
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    engine.set_seed(cfg.train.seed)
    models = build_models(cfg, tokenizer, with_value=estimator.needs_value_model, device=device)
    policy, reference, value = models.policy, models.reference, models.value
    if reward is None:
        reward = ModelReward(cfg.reward.model, cfg.reward.template, cfg.reward.batch_size, device)
    trained = _Trained(policy, value)
    trainable, total = count_parameters(policy)

    # 4. Encode prompts with the policy's chat template (+ generation prompt); ptx examples as SFT does.
    from instructkit.data.templates import encode_prompt

    kept, too_long = [], 0
    for p in prompts:
        p.ids = encode_prompt(tokenizer, p.messages, cfg.data.template)
        if len(p.ids) <= cfg.data.max_prompt_length:
            kept.append(p)
        else:
            too_long += 1
    prompts = kept
    if len(prompts) < cfg.rollout_batch_size:
        raise InputError(f"{len(prompts)} usable prompts (after {too_long} too long for max_prompt_length="
                         f"{cfg.data.max_prompt_length}) is fewer than rollout_batch_size {cfg.rollout_batch_size}",
                         file=cfg.data.path)
    ptx_examples: list[dict[str, list[int]]] = []
    if ptx_records is not None:
        ptx_examples, _ = encode_records(tokenizer, ptx_records, template=cfg.data.template,
                                         max_length=cfg.data.ptx_max_length, where=cfg.data.ptx_path)
        if not ptx_examples:
            raise InputError("no ptx example fits ptx_max_length", file=cfg.data.ptx_path)
    ptx = PtxTerm(CausalLMLoss(policy, cfg.train.loss_chunk_size), ptx_examples,
                  make_collate(tokenizer.pad_token_id, packed=False), cfg.data.ptx_batch_size, cfg.ptx_coef,
                  cfg.train.seed) if ptx_examples else None
    stop_ids, stop_strings = stop_tokens(policy, tokenizer, None, cfg.data.template)

    # 5. Optimizer over policy + value, schedule, KL controller, EMA; resume from the last checkpoint.
    n_seq = cfg.rollout_batch_size * cfg.group_size
    updates_per_step = _updates(cfg)
    total_steps = cfg.train.max_steps
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = engine.build_optimizer(params, cfg.optim)
    scheduler = engine.build_scheduler(optimizer, cfg.optim, total_steps * updates_per_step)
    kl_ctl = (rl.AdaptiveKLController(cfg.kl_coef, cfg.adaptive_kl.target, cfg.adaptive_kl.horizon)
              if cfg.adaptive_kl.target is not None else rl.FixedKLController(cfg.kl_coef))
    ema = ({n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
           if cfg.ema_decay is not None else None)
    metrics = engine.MetricsLog(run.metrics)
    start_step = 0
    resume_from = run.latest_checkpoint()
    if resume_from is not None:
        state = _load_checkpoint(resume_from, trained=trained, optimizer=optimizer, scheduler=scheduler, ema=ema)
        start_step = state["step"]
        kl_ctl.load_state_dict(state["kl_controller"])
        metrics.truncate_after(start_step)
        print(f"resuming from {resume_from} (step {start_step} of {total_steps})", flush=True)
    plan = engine.StepPlan(len(prompts), cfg.rollout_batch_size, cfg.train.seed)

    def checkpoint(step: int) -> None:
        state = {"step": step, "total_steps": total_steps, "kl_controller": kl_ctl.state_dict()}
        _save_checkpoint(run.checkpoints / f"step-{step:06d}", trained=trained, optimizer=optimizer,
                         scheduler=scheduler, state=state, ema=ema)
        engine.prune_checkpoints(run.checkpoints, cfg.train.keep_checkpoints)

    progress = None
    if cfg.train.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, initial=start_step, desc="ppo", dynamic_ncols=True)
    autocast = accelerator.autocast
    chunk = cfg.train.loss_chunk_size
    step = start_step
    history: list[dict[str, Any]] = []
    gen_seconds = train_seconds = 0.0
    started = time.time()
    stop = _StopAtStepEnd()
    try:
        while step < total_steps:
            # 6a. Rollout: group_size responses per prompt, sampled with their log-probs.
            t0 = time.perf_counter()
            batch_prompts = [prompts[i] for i in plan.indices(step) for _ in range(cfg.group_size)]
            with autocast():
                rollout = sample(policy, [p.ids for p in batch_prompts], stop_ids=stop_ids,
                                 pad_id=tokenizer.pad_token_id, max_new_tokens=cfg.max_new_tokens,
                                 temperature=cfg.temperature, top_p=cfg.top_p,
                                 batch_size=cfg.generation_batch_size, seed=_seed(cfg.train.seed, step))
            texts = [decode_response(tokenizer, row[:int(n)].tolist(), stop_ids, stop_strings)
                     for row, n in zip(rollout.responses, rollout.lengths)]
            generate_s = time.perf_counter() - t0

            # 6b. Score; responses cut at max_new_tokens may pay the missing-EOS penalty.
            t1 = time.perf_counter()
            raw_scores = torch.tensor(reward(batch_prompts, texts), dtype=torch.float32, device=device)
            scores = raw_scores.clone()
            if cfg.missing_eos_penalty is not None:
                scores[~rollout.ended] -= cfg.missing_eos_penalty

            # 6c. Reference log-probs and old values, before any update.
            mask = rollout.response_mask
            policy.eval()
            with autocast():
                ref_logprobs = in_chunks(lambda b: reference.logprobs(b, cfg.temperature, chunk), rollout,
                                         cfg.train.batch_size)
                old_values = in_chunks(lambda b: response_values(value, b), rollout, cfg.train.batch_size) \
                    if value is not None else None

            # 6d. Rewards (score - beta * KL per token), advantages from the estimator, whitening.
            kl = kl_estimator(rollout.logprobs, ref_logprobs) * mask  # (N, R)
            rewards = rl.kl_penalized_rewards(scores, kl, mask, kl_ctl.value)
            if cfg.whiten_rewards:
                rewards = rl.masked_whiten(rewards, mask, shift_mean=False)
            advantages, returns = estimator.estimate(rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.lam,
                                                     group_size=cfg.group_size)
            if cfg.whiten_advantages:
                advantages = rl.masked_whiten(advantages, mask)

            # 6e. PPO epochs over shuffled mini-batches, one optimizer step each.
            policy.train()
            stats = _update(cfg, step, policy=policy, value=value, rollout=rollout, advantages=advantages,
                            returns=returns, old_values=old_values, params=params, optimizer=optimizer,
                            scheduler=scheduler, autocast=autocast, ptx=ptx)
            train_s = time.perf_counter() - t1
            gen_seconds += generate_s
            train_seconds += train_s
            step += 1

            # 6f. Adapt the KL coefficient (Ziegler et al.), update the EMA, log, checkpoint.
            seq_kl = float(kl.sum(1).mean())
            record = {"step": step, "loss": stats.pop("loss"), "lr": stats.pop("lr"),
                      "tokens_per_s": float(mask.sum()) / max(generate_s + train_s, 1e-9),
                      "reward_mean": float(raw_scores.mean()), "reward_std": float(raw_scores.std(unbiased=False)),
                      "kl": seq_kl, "kl_coef": kl_ctl.value,
                      "entropy": float(rl.masked_mean(rollout.entropy, mask)),
                      "response_length": float(rollout.lengths.mean()),
                      "eos_fraction": float(rollout.ended.float().mean()),
                      **stats, "generate_seconds": round(generate_s, 4), "train_seconds": round(train_s, 4)}
            kl_ctl.update(seq_kl, n_seq)
            if ema is not None:
                with torch.no_grad():
                    for n, p in policy.named_parameters():
                        if n in ema:
                            ema[n].lerp_(p.detach(), 1.0 - cfg.ema_decay)
            if step % cfg.train.log_every == 0 or step == total_steps:
                metrics.write(record)
            history.append(record)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(reward=f"{record['reward_mean']:.3f}", kl=f"{seq_kl:.3f}")
            if (cfg.train.save_every and step % cfg.train.save_every == 0) or step == total_steps or stop.asked:
                checkpoint(step)
            if stop.asked:
                raise KeyboardInterrupt(f"stopped after step {step}; the run resumes from its checkpoint")
            if on_step is not None:
                on_step(step)
    finally:
        stop.restore()
        if progress is not None:
            progress.close()

    # 7. Save final/ (the EMA weights when enabled) and the summary.
    if ema is not None:
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if n in ema:
                    p.copy_(ema[n])
    last = history[-1] if history else {}
    summary = {
        "stage": "ppo",
        "model": cfg.model,
        "advantage": cfg.advantage,
        "method": cfg.peft.method,
        "steps": step,
        "reward_mean": last.get("reward_mean"),
        "kl": last.get("kl"),
        "kl_coef": kl_ctl.value,
        "generate_seconds": round(gen_seconds, 2),
        "train_seconds": round(train_seconds, 2),
        "wall_seconds": round(time.time() - started, 2),
        "prompts": len(prompts),
        "dropped_too_long": too_long,
        "ptx_examples": len(ptx_examples),
        "ema": cfg.ema_decay is not None,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "final": str(run.final),
    }
    save_final(policy, tokenizer, run, base_spec=cfg.model, merged=cfg.save_merged and is_peft(policy))
    engine.atomic_write_json(run.summary, summary)
    return summary


def _update(cfg: PPOConfig, step: int, *, policy, value, rollout, advantages, returns, old_values, params,
            optimizer, scheduler, autocast, ptx) -> dict[str, float]:
    """``ppo_epochs`` passes over the rollout in shuffled mini-batches of ``batch_size x grad_accum``
    sequences; each mini-batch's loss is its token mean (exact over its micro-batches), plus
    ``ptx_coef`` times the LM loss of one ptx batch. Returns the step's mean statistics."""
    from instructkit.losses import rl
    from instructkit.train.rollout import response_logprobs, response_values

    n = len(rollout)
    mini = cfg.train.batch_size * cfg.train.grad_accum
    sums: dict[str, float] = {}
    updates = 0
    device = rollout.query_responses.device

    def add(name: str, x: float) -> None:
        sums[name] = sums.get(name, 0.0) + x

    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(cfg.train.seed, step) * 101 + epoch))
        for start in range(0, n, mini):
            idx = order[start:start + mini]
            denom = rollout.response_mask[idx].sum().clamp(min=1)
            add("lr", scheduler.get_last_lr()[0])
            for micro in idx.split(cfg.train.batch_size):
                b = rollout.select(micro)
                w, rows = b.width, micro.to(device)
                share = float(b.response_mask.sum() / denom)
                with autocast():
                    logprobs = response_logprobs(policy, b, cfg.temperature, cfg.train.loss_chunk_size)
                    pg_loss, clip_frac = rl.clipped_policy_loss(logprobs, b.logprobs, advantages[rows, :w],
                                                                b.response_mask, cfg.clip_range, normalizer=denom)
                    loss = pg_loss
                    if value is not None:
                        values = response_values(value, b)
                        vf_loss, vf_clip = rl.clipped_value_loss(values, old_values[rows, :w], returns[rows, :w],
                                                                 b.response_mask, cfg.value_clip_range,
                                                                 normalizer=denom)
                        loss = loss + cfg.vf_coef * vf_loss
                        add("value_loss", float(vf_loss.detach()))
                        add("value_clip_frac", float(vf_clip) * share)
                loss.backward()
                add("policy_loss", float(pg_loss.detach()))
                add("clip_frac", float(clip_frac) * share)
                approx_kl = 0.5 * rl.masked_sum((logprobs.detach() - b.logprobs) ** 2, b.response_mask) / denom
                add("approx_kl", float(approx_kl))
                add("loss", float(loss.detach()))
            if ptx is not None:
                with autocast():
                    ptx_loss = ptx.backward(step * _updates(cfg) + updates, device)
                add("ptx_loss", ptx_loss)
                add("loss", cfg.ptx_coef * ptx_loss)
            if cfg.optim.max_grad_norm:
                add("grad_norm", float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            updates += 1
    return {k: v / updates for k, v in sums.items()}


# ----------------------------------------------------------------------------------------------
# Small helpers


class _StopAtStepEnd:
    """Ctrl-C or SIGTERM asks the loop to stop after the step in progress, once it is
    checkpointed: a checkpoint taken mid-update would not resume onto the same curve. A second
    signal stops at once (without a checkpoint)."""

    def __init__(self) -> None:
        self.asked = False
        self.previous: dict[int, Any] = {}
        names = ("SIGINT", "SIGTERM")
        with contextlib.suppress(ValueError):  # not the main thread: leave the handlers alone
            for sig in (getattr(signal, n) for n in names if hasattr(signal, n)):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        print("\nstopping after this step (again to stop now)", flush=True)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _seed(seed: int, step: int) -> int:
    """The seed of one PPO step's sampling and shuffling: a function of (seed, step) only."""
    return (seed * 1_000_003 + step) % (2**31 - 1)


def _updates(cfg: PPOConfig) -> int:
    """Optimizer steps per PPO step."""
    return cfg.ppo_epochs * (cfg.rollout_batch_size * cfg.group_size) // (cfg.train.batch_size * cfg.train.grad_accum)


def _lookup(registry: dict[str, Any], name: str, key: str) -> Any:
    if name not in registry:
        raise InputError(f"unknown {key} '{name}' (one of {', '.join(registry)}){did_you_mean(name, registry)}",
                         field=key)
    return registry[name]


def _check(cfg: PPOConfig, estimator) -> None:
    """What the config sections shared with SFT may set that PPO has no use for, and the shapes
    that must fit together."""
    if not cfg.data.path:
        raise InputError("no prompts: set data.path", field="data.path")
    if not cfg.reward.model and not cfg.reward.function:
        raise InputError("no reward: set reward.model (a reward-model folder) or reward.function "
                         "(module:function)", field="reward")
    if not cfg.train.max_steps:
        raise InputError("set the number of PPO steps", field="train.max_steps")
    if estimator.group_relative and cfg.group_size < 2:
        raise InputError(f"{cfg.advantage} compares responses within a group: set group_size >= 2",
                         field="group_size")
    n_seq, mini = cfg.rollout_batch_size * cfg.group_size, cfg.train.batch_size * cfg.train.grad_accum
    if n_seq % mini:
        raise InputError(f"rollout_batch_size x group_size = {n_seq} responses do not split into mini-batches "
                         f"of train.batch_size x train.grad_accum = {mini}", field="train.batch_size")
    unused = {"train.eval_every": cfg.train.eval_every,
              "train.early_stopping_patience": cfg.train.early_stopping_patience}
    for key, value in unused.items():
        if value:
            raise InputError("PPO has no validation loss to evaluate or stop on", field=key)
    if cfg.train.dropout:
        raise InputError("PPO runs with dropout off (log-probs must match between sampling and training)",
                         field="train.dropout")
    if cfg.train.epochs != 1.0:
        raise InputError("PPO runs train.max_steps steps; epochs over the prompts do not apply",
                         field="train.epochs")
