"""DPO-family recipe: preference pairs in, a policy that prefers the chosen responses out.

One recipe for every loss in :data:`instructkit.losses.preference.PREFERENCE_LOSSES` (DPO,
conservative DPO, IPO, hinge, SimPO, ORPO, KTO): the recipe computes sequence log-probs, the
registry entry says what else its loss needs (a reference model, length normalisation, paired
or unpaired data). Reads top to bottom: config -> data -> model -> encode -> reference log-probs
-> train -> held-out margins -> save.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from instructkit.config import DPOConfig
from instructkit.stages import resolve_stage_config


class PreferenceLoss(nn.Module):
    """(summed preference loss, number of pairs or examples) for one collated batch.

    Reference log-probs come precomputed in the batch (``ref_logps``) or, with
    ``reference="adapter"``, from the same peft model with its adapter disabled.
    """

    def __init__(self, model: nn.Module, cfg: DPOConfig, reference: str, chunk_size: int) -> None:
        super().__init__()
        from instructkit.losses.preference import PREFERENCE_LOSSES

        self.model = model
        self.cfg = cfg
        self.spec = PREFERENCE_LOSSES[cfg.loss]
        self.reference = reference
        self.chunk_size = chunk_size
        self.last: dict[str, float] = {}

    def logps(self, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
        from instructkit.models.lm import sequence_log_probs

        return sequence_log_probs(self.model, input_ids, attention_mask, labels, chunk_size=self.chunk_size)

    @torch.no_grad()
    def reference_logps(self, input_ids, attention_mask, labels) -> torch.Tensor:
        with self.model.disable_adapter():
            return self.logps(input_ids, attention_mask, labels)[0]

    def forward(self, input_ids, attention_mask, labels, ref_logps=None, desirable=None):
        from instructkit.losses.preference import preference_loss

        logps, counts = self.logps(input_ids, attention_mask, labels)  # (R,), (R,)
        if self.spec.needs_reference and ref_logps is None:
            ref_logps = self.reference_logps(input_ids, attention_mask, labels)
        ref = ref_logps.to(logps.dtype) if ref_logps is not None else None
        kw = dict(
            beta=self.cfg.beta,
            label_smoothing=self.cfg.label_smoothing,
            simpo_gamma=self.cfg.simpo_gamma,
            orpo_lambda=self.cfg.orpo_lambda,
        )
        if self.spec.paired:
            b = logps.size(0) // 2
            out = preference_loss(
                self.cfg.loss,
                chosen_logps=logps[:b],
                rejected_logps=logps[b:],
                chosen_tokens=counts[:b],
                rejected_tokens=counts[b:],
                ref_chosen_logps=None if ref is None else ref[:b],
                ref_rejected_logps=None if ref is None else ref[b:],
                **kw,
            )
        else:
            good, bad = desirable, ~desirable
            # KTO's reference point z0: the batch's mean policy/reference log-ratio, detached and
            # clamped at 0 (the paper estimates it from mismatched pairs; this avoids a second
            # forward pass and is the same estimator on matched ones).
            kl_ref = (logps - ref).detach().mean().clamp(min=0)
            out = preference_loss(
                self.cfg.loss,
                chosen_logps=logps[good],
                rejected_logps=logps[bad],
                chosen_tokens=counts[good],
                rejected_tokens=counts[bad],
                ref_chosen_logps=ref[good],
                ref_rejected_logps=ref[bad],
                kl_ref=kl_ref,
                **kw,
            )
        chosen, rejected = out.chosen_rewards.detach(), out.rejected_rewards.detach()
        if self.spec.paired:
            self.last = {
                "reward_chosen": float(chosen.sum()),
                "reward_rejected": float(rejected.sum()),
                "margin": float((chosen - rejected).sum()),
                "correct": float((chosen > rejected).sum()),
                "pairs": float(chosen.numel()),
            }
        else:
            self.last = {
                "reward_chosen": float(chosen.sum()),
                "reward_rejected": float(rejected.sum()),
                "desirable": float(chosen.numel()),
                "undesirable": float(rejected.numel()),
            }
        return out.losses.sum(), torch.tensor(out.losses.numel(), device=logps.device)


def finish_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Per-pair means of the summed implicit-reward statistics of one optimizer step."""
    if "pairs" in sums:
        n = max(sums["pairs"], 1)
        return {
            "reward_chosen": sums["reward_chosen"] / n,
            "reward_rejected": sums["reward_rejected"] / n,
            "reward_margin": sums["margin"] / n,
            "reward_accuracy": sums["correct"] / n,
        }
    return {
        "reward_desirable": sums["reward_chosen"] / max(sums["desirable"], 1),
        "reward_undesirable": sums["reward_rejected"] / max(sums["undesirable"], 1),
    }


def precompute_reference(
    model: nn.Module, examples: list[dict[str, Any]], collate, batch_size: int, chunk_size: int
) -> None:
    """Store each example's reference log-probs (the model as it is now) in ``example["ref"]``."""
    from instructkit.models.lm import sequence_log_probs
    from instructkit.models.passes import no_grad_batches

    def without_ref(chunk):
        return collate([{k: v for k, v in e.items() if k != "ref"} for e in chunk])

    for chunk, batch in no_grad_batches(model, examples, without_ref, batch_size):
        logps, _ = sequence_log_probs(
            model, batch["input_ids"], batch["attention_mask"], batch["labels"], chunk_size=chunk_size
        )
        logps = logps.double().cpu().tolist()
        n = len(chunk)
        for i, example in enumerate(chunk):
            example["ref"] = (logps[i], logps[n + i]) if "chosen" in example else (logps[i],)


def reference_logps(stage, model: nn.Module, examples: list[dict[str, Any]], collate, cfg: DPOConfig) -> None:
    """Reference log-probs from the starting weights, computed once and saved beside the run
    (a resumed run reads them back: by then the weights have moved on)."""
    import json

    from instructkit.fileio import atomic_write_json

    saved = stage.run.path / "reference_logps.json"
    if stage.run.latest_checkpoint() is not None and saved.is_file():
        for example, ref in zip(examples, json.loads(saved.read_text())):
            example["ref"] = tuple(ref)
        return
    with stage.accelerator.autocast():  # the same precision the training forward passes use
        precompute_reference(model, examples, collate, cfg.train.batch_size, cfg.train.loss_chunk_size)
    if stage.is_main:
        atomic_write_json(saved, [e["ref"] for e in examples])


def held_out(
    loss_module: PreferenceLoss, examples: Sequence[dict[str, Any]], collate, batch_size: int
) -> dict[str, float]:
    """Loss and implicit-reward statistics over held-out examples."""
    from instructkit.models.passes import no_grad_batches

    sums: dict[str, float] = {}
    loss = count = 0.0
    for _, batch in no_grad_batches(loss_module, examples, collate, batch_size):
        loss_sum, n = loss_module(**batch)
        loss, count = loss + float(loss_sum), count + float(n)
        for k, v in loss_module.last.items():
            sums[k] = sums.get(k, 0.0) + v
    return {"loss": loss / max(count, 1), **finish_metrics(sums)}


def dpo(
    config: DPOConfig | str | Path | dict | None = None,
    overrides: list[str] | None = None,
    *,
    on_step: Callable[[int], None] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train a policy on preferences with the configured loss; returns the run summary."""
    from instructkit.data.collate import preference_collate
    from instructkit.data.encoders import as_pairs, as_unpaired, encode_preferences, preference_rows
    from instructkit.losses.preference import PREFERENCE_LOSSES
    from instructkit.train import engine, setup

    # 1. Config, the loss's needs, and the run folder (a finished run with this config is returned).
    cfg = resolve_stage_config(DPOConfig, "dpo", config, overrides)
    spec = PREFERENCE_LOSSES[cfg.loss]
    reference = cfg.reference if cfg.reference != "auto" else "precompute"
    stage = setup.open_run(cfg, stage="dpo", overwrite=overwrite)
    if stage.finished:
        return stage.run.saved_summary()
    with stage.cleanup_on_failure():
        # 2. Data: pairs (rankings give every untied pair), or unpaired examples for KTO.
        splits = setup.load_splits(cfg.data, as_pairs if spec.paired else as_unpaired, what="preference pairs")

        # 3. The policy, and what trains. Dropout off: the reference and policy log-probs must
        #    differ only by the weights.
        dropout = cfg.train.dropout if cfg.train.dropout is not None else 0.0
        parts = setup.load_trainable(cfg, device=stage.accelerator.device, merge_adapter=True, dropout=dropout)

        # 4. Encode prompt + response with the chat template; only response tokens are scored.
        d = cfg.data
        encode = partial(
            encode_preferences, parts.tokenizer, template=d.template, max_length=d.max_length, paired=spec.paired
        )
        enc = setup.encode_splits(splits, encode, d, "no training examples left after encoding")
        train_ex, val_ex = enc.train, enc.val
        collate = preference_collate(parts.tokenizer.pad_token_id)

        # 5. Reference log-probs: once, from the starting weights (no second model copy), or per
        #    batch from the adapter-disabled base.
        if spec.needs_reference and reference == "precompute":
            reference_logps(stage, parts.model, train_ex + val_ex, collate, cfg)
        loss_module = PreferenceLoss(parts.model, cfg, reference, cfg.train.loss_chunk_size)

        # 6. Train: each pair (or KTO example) weighs 1; chosen and rejected share one forward pass.
        started = time.time()
        result = engine.fit(
            loss_module=loss_module,
            model=parts.model,
            examples=train_ex,
            collate=collate,
            weight=lambda e: 1,
            length=lambda e: sum(len(ids) for ids, _ in preference_rows(e)),
            train=cfg.train,
            optim=cfg.optim,
            run=stage.run,
            accelerator=stage.accelerator,
            on_step=on_step,
            # Held-out pairs go to the loop only for periodic evaluation: the final pass is step 7's.
            val_examples=val_ex if cfg.train.eval_every else (),
            count_key="pairs" if spec.paired else "examples",
            extra_metrics=lambda batch, ran: dict(ran.last),
            finish_metrics=finish_metrics,
        )

    # 7. Held-out implicit rewards (0 margin before training, by construction, when the
    #    reference is the starting model), then save the policy like SFT does.
    with stage.accelerator.autocast():
        val = held_out(loss_module, val_ex, collate, cfg.train.batch_size) if val_ex else {}
    own = {"loss": cfg.loss, "beta": cfg.beta, "reference": reference if spec.needs_reference else None}
    counts = {"train_examples": len(train_ex), "val_examples": len(val_ex), "dropped_too_long": enc.dropped}
    held = {f"val_{k}": v for k, v in val.items()}
    summary = setup.stage_summary("dpo", cfg, parts, stage.run, **own, **result.summary(started), **held, **counts)
    return stage.finish(
        summary, lambda: setup.save_final(parts.model, parts.tokenizer, stage.run, base_spec=cfg.model, merged=False)
    )
