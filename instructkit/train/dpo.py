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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from instructkit.config import DPOConfig, resolve_stage_config
from instructkit.data.schema import Preference, Ranking, Unpaired
from instructkit.errors import InputError


def as_pairs(records: Sequence[Any], where: str) -> list[Preference]:
    """Preference pairs; a K-wise ranking gives every untied pair of its responses."""
    out = []
    for i, record in enumerate(records):
        if isinstance(record, Preference):
            out.append(record)
        elif isinstance(record, Ranking):
            ranks = record.ranks or list(range(len(record.responses)))
            for a in range(len(ranks)):
                for b in range(len(ranks)):
                    if ranks[a] < ranks[b]:
                        out.append(Preference(record.prompt, record.responses[a], record.responses[b]))
        else:
            raise InputError(f"DPO trains on preference pairs or rankings, not {type(record).__name__} records "
                             f"(KTO takes unpaired examples: set loss: kto)", file=where, record=i)
    return out


def as_unpaired(records: Sequence[Any], where: str) -> list[Unpaired]:
    """KTO examples: unpaired as given, or each pair split into a desirable and an undesirable one."""
    out = []
    for i, record in enumerate(records):
        if isinstance(record, Unpaired):
            out.append(record)
        elif isinstance(record, (Preference, Ranking)):
            for pair in as_pairs([record], where):
                out += [Unpaired(pair.prompt, pair.chosen, True), Unpaired(pair.prompt, pair.rejected, False)]
        else:
            raise InputError(f"KTO trains on labelled (unpaired) examples or pairs, not {type(record).__name__} "
                             f"records", file=where, record=i)
    return out


def encode_examples(tokenizer, records: Sequence[Any], *, template: str | None, max_length: int,
                    paired: bool) -> tuple[list[dict[str, Any]], int]:
    """Pairs as {"chosen": (ids, labels), "rejected": (ids, labels)}; unpaired examples as
    {"completion": (ids, labels), "label": bool}. Only response tokens are labelled; a response
    that does not fit is cut (keeping its end-of-turn)."""
    from instructkit.data.templates import Truncation, encode_prompt_response

    def encode(prompt, response):
        enc = encode_prompt_response(tokenizer, prompt, response, template=template, max_length=max_length,
                                     truncation=Truncation.CUT_RESPONSE)
        return None if enc is None else (list(enc.input_ids), list(enc.labels))

    out, dropped = [], 0
    for record in records:
        if paired:
            chosen, rejected = encode(record.prompt, record.chosen), encode(record.prompt, record.rejected)
            example = {"chosen": chosen, "rejected": rejected} if chosen and rejected else None
        else:
            completion = encode(record.prompt, record.completion)
            example = {"completion": completion, "label": record.label} if completion else None
        if example is None:
            dropped += 1
        else:
            out.append(example)
    return out, dropped


def _rows(example: dict[str, Any]) -> list[tuple[list[int], list[int]]]:
    return [example["chosen"], example["rejected"]] if "chosen" in example else [example["completion"]]


def make_collate(pad_id: int) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Pairs: all chosen rows then all rejected rows, one right-padded (2B, T) batch, so both go
    through the model in one forward pass. Unpaired: (B, T) plus a desirable/undesirable label."""
    from instructkit.data.collate import pad_batch

    def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        paired = "chosen" in batch[0]
        rows = ([e["chosen"] for e in batch] + [e["rejected"] for e in batch]) if paired \
            else [e["completion"] for e in batch]
        out = pad_batch([{"input_ids": ids, "labels": labels} for ids, labels in rows], pad_id=pad_id)
        if "ref" in batch[0]:
            refs = [e["ref"] for e in batch]
            out["ref_logps"] = torch.tensor([r[0] for r in refs] + ([r[1] for r in refs] if paired else []),
                                            dtype=torch.float64)
        if not paired:
            out["desirable"] = torch.tensor([bool(e["label"]) for e in batch])
        return out

    return collate


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
        kw = dict(beta=self.cfg.beta, label_smoothing=self.cfg.label_smoothing, simpo_gamma=self.cfg.simpo_gamma,
                  orpo_lambda=self.cfg.orpo_lambda)
        if self.spec.paired:
            b = logps.size(0) // 2
            out = preference_loss(
                self.cfg.loss, chosen_logps=logps[:b], rejected_logps=logps[b:], chosen_tokens=counts[:b],
                rejected_tokens=counts[b:], ref_chosen_logps=None if ref is None else ref[:b],
                ref_rejected_logps=None if ref is None else ref[b:], **kw)
        else:
            good, bad = desirable, ~desirable
            # KTO's reference point z0: the batch's mean policy/reference log-ratio, detached and
            # clamped at 0 (the paper estimates it from mismatched pairs; this avoids a second
            # forward pass and is the same estimator on matched ones).
            kl_ref = (logps - ref).detach().mean().clamp(min=0)
            out = preference_loss(
                self.cfg.loss, chosen_logps=logps[good], rejected_logps=logps[bad], chosen_tokens=counts[good],
                rejected_tokens=counts[bad], ref_chosen_logps=ref[good], ref_rejected_logps=ref[bad],
                kl_ref=kl_ref, **kw)
        chosen, rejected = out.chosen_rewards.detach(), out.rejected_rewards.detach()
        if self.spec.paired:
            self.last = {"reward_chosen": float(chosen.sum()), "reward_rejected": float(rejected.sum()),
                         "margin": float((chosen - rejected).sum()), "correct": float((chosen > rejected).sum()),
                         "pairs": float(chosen.numel())}
        else:
            self.last = {"reward_chosen": float(chosen.sum()), "reward_rejected": float(rejected.sum()),
                         "desirable": float(chosen.numel()), "undesirable": float(rejected.numel())}
        return out.losses.sum(), torch.tensor(out.losses.numel(), device=logps.device)


def finish_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Per-pair means of the summed implicit-reward statistics of one optimizer step."""
    if "pairs" in sums:
        n = max(sums["pairs"], 1)
        return {"reward_chosen": sums["reward_chosen"] / n, "reward_rejected": sums["reward_rejected"] / n,
                "reward_margin": sums["margin"] / n, "reward_accuracy": sums["correct"] / n}
    return {"reward_desirable": sums["reward_chosen"] / max(sums["desirable"], 1),
            "reward_undesirable": sums["reward_rejected"] / max(sums["undesirable"], 1)}


@torch.no_grad()
def precompute_reference(model: nn.Module, examples: list[dict[str, Any]], collate, batch_size: int,
                         chunk_size: int) -> None:
    """Store each example's reference log-probs (the model as it is now) in ``example["ref"]``."""
    from instructkit.models.lm import sequence_log_probs

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = collate([{k: v for k, v in e.items() if k != "ref"} for e in chunk])
        logps, _ = sequence_log_probs(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                      batch["labels"].to(device), chunk_size=chunk_size)
        logps = logps.double().cpu().tolist()
        n = len(chunk)
        for i, example in enumerate(chunk):
            example["ref"] = (logps[i], logps[n + i]) if "chosen" in example else (logps[i],)
    model.train(was_training)


@torch.no_grad()
def held_out(loss_module: PreferenceLoss, examples: Sequence[dict[str, Any]], collate, batch_size: int) -> dict[str, float]:
    """Loss and implicit-reward statistics over held-out examples."""
    was_training = loss_module.training
    loss_module.eval()
    sums: dict[str, float] = {}
    loss = count = 0.0
    device = next(loss_module.parameters()).device
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(list(examples[start:start + batch_size])).items()}
        loss_sum, n = loss_module(**batch)
        loss, count = loss + float(loss_sum), count + float(n)
        for k, v in loss_module.last.items():
            sums[k] = sums.get(k, 0.0) + v
    loss_module.train(was_training)
    return {"loss": loss / max(count, 1), **finish_metrics(sums)}


def dpo(config: DPOConfig | str | Path | dict | None = None, overrides: list[str] | None = None, *,
        on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train a policy on preferences with the configured loss; returns the run summary."""
    from instructkit.data.formats import load_records
    from instructkit.data.split import split_records
    from instructkit.datasets import resolve_data_path
    from instructkit.errors import did_you_mean
    from instructkit.losses.preference import PREFERENCE_LOSSES
    from instructkit.models.loading import load_model, load_tokenizer
    from instructkit.models.peft_methods import apply_method, count_parameters
    from instructkit.train import engine
    from instructkit.train.sft import save_final

    # 1. Config, the loss's needs, and the run folder.
    cfg = resolve_stage_config(DPOConfig, "dpo", config, overrides)
    if cfg.loss not in PREFERENCE_LOSSES:
        raise InputError(f"unknown loss '{cfg.loss}' (one of {', '.join(PREFERENCE_LOSSES)})"
                         f"{did_you_mean(cfg.loss, PREFERENCE_LOSSES)}", field="loss")
    spec = PREFERENCE_LOSSES[cfg.loss]
    if not cfg.data.path:
        raise InputError("no training data: set data.path (preference pairs)", field="data.path")
    reference = cfg.reference if cfg.reference != "auto" else "precompute"
    if reference == "adapter" and cfg.peft.method not in ("lora", "dora", "ia3"):
        raise InputError("reference: adapter needs a peft method (lora, dora, ia3); use precompute",
                         field="reference")
    run = engine.RunDir(Path(cfg.out))
    accelerator = engine.make_accelerator(cfg.train)
    if accelerator.is_main_process:
        run.path.mkdir(parents=True, exist_ok=True)
        run.write_config(cfg)

    # 2. Data: pairs (rankings give every untied pair), or unpaired examples for KTO.
    convert = as_pairs if spec.paired else as_unpaired
    loaded = load_records(resolve_data_path(cfg.data.path), format=cfg.data.format, columns=cfg.data.columns)
    records = loaded.records[: cfg.data.limit] if cfg.data.limit else loaded.records
    if cfg.data.val_path:
        train_records = convert(records, cfg.data.path)
        val_records = convert(load_records(resolve_data_path(cfg.data.val_path), format=cfg.data.format,
                                           columns=cfg.data.columns).records, cfg.data.val_path)
    else:  # split records before converting, so one prompt's pairs stay on one side
        train_part, val_part, _ = split_records(records, val_fraction=cfg.data.val_fraction, test_fraction=0.0,
                                                seed=cfg.data.seed)
        train_records, val_records = convert(train_part, cfg.data.path), convert(val_part, cfg.data.path)

    # 3. The policy, and what trains. Dropout off: the reference and policy log-probs must
    #    differ only by the weights.
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    engine.set_seed(cfg.train.seed)
    model = load_model(cfg.model, dtype="fp32", device="cpu", merge_adapter=True,
                       trust_remote_code=cfg.trust_remote_code)
    engine.set_dropout(model, cfg.train.dropout if cfg.train.dropout is not None else 0.0)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = apply_method(model, cfg.peft)
    trainable, total = count_parameters(model)
    model.to(accelerator.device)

    # 4. Encode prompt + response with the chat template; only response tokens are scored.
    train_ex, dropped = encode_examples(tokenizer, train_records, template=cfg.data.template,
                                        max_length=cfg.data.max_length, paired=spec.paired)
    val_ex, val_dropped = encode_examples(tokenizer, val_records, template=cfg.data.template,
                                          max_length=cfg.data.max_length, paired=spec.paired)
    if not train_ex:
        raise InputError("no training examples left after encoding", file=cfg.data.path)
    collate = make_collate(tokenizer.pad_token_id)

    # 5. Reference log-probs: once, now, from the starting weights (no second model copy), or
    #    per batch from the adapter-disabled base.
    if spec.needs_reference and reference == "precompute" and not engine.RunDir(Path(cfg.out)).latest_checkpoint():
        with accelerator.autocast():  # the same precision the training forward passes use
            precompute_reference(model, train_ex + val_ex, collate, cfg.train.batch_size, cfg.train.loss_chunk_size)
        engine.atomic_write_json(run.path / "reference_logps.json", [e["ref"] for e in train_ex + val_ex])
    elif spec.needs_reference and reference == "precompute":  # resuming: the weights have moved on
        import json

        refs = json.loads((run.path / "reference_logps.json").read_text())
        for example, ref in zip(train_ex + val_ex, refs):
            example["ref"] = tuple(ref)
    loss_module = PreferenceLoss(model, cfg, reference, cfg.train.loss_chunk_size)

    # 6. Train: each pair (or KTO example) weighs 1; chosen and rejected share one forward pass.
    started = time.time()
    result = engine.fit(
        loss_module=loss_module, model=model, examples=train_ex, collate=collate, weight=lambda e: 1,
        length=lambda e: sum(len(ids) for ids, _ in _rows(e)), train=cfg.train, optim=cfg.optim, run=run,
        # Held-out pairs go to the loop only for periodic evaluation: the final pass is step 7's.
        accelerator=accelerator, val_examples=val_ex if cfg.train.eval_every else (), on_step=on_step,
        count_key="pairs" if spec.paired else "examples",
        extra_metrics=lambda batch: dict(loss_module.last), finish_metrics=finish_metrics)

    # 7. Held-out implicit rewards (0 margin before training, by construction, when the
    #    reference is the starting model), then save the policy like SFT does.
    with accelerator.autocast():
        val = held_out(loss_module, val_ex, collate, cfg.train.batch_size) if val_ex else {}
    summary = {
        "stage": "dpo",
        "loss": cfg.loss,
        "beta": cfg.beta,
        "model": cfg.model,
        "method": cfg.peft.method,
        "reference": reference if spec.needs_reference else None,
        **result.summary(started),
        **{f"val_{k}": v for k, v in val.items()},
        "train_examples": len(train_ex),
        "val_examples": len(val_ex),
        "dropped_too_long": dropped + val_dropped,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "final": str(run.final),
    }
    if accelerator.is_main_process:
        save_final(model, tokenizer, run, base_spec=cfg.model, merged=False)
        engine.atomic_write_json(run.summary, summary)
    accelerator.wait_for_everyone()
    return summary


