"""Distillation recipe: a teacher's next-token distributions (or its answers) taught to a student.

Reads top to bottom: config -> data -> student and teacher -> (sequence mode: the teacher writes
the targets) -> encode -> train -> save. Three modes:

- ``offline``: both models read the demonstrations; the student matches the teacher's token
  distributions on the trained (assistant) positions, or with ``positions: all`` on every token
  of the demonstration, prompt included (more of the teacher's knowledge per example: what heals a
  pruned student), the loss still divided by the trained tokens;
- ``on_policy``: the student samples its own answers to the demonstrations' prompts every step
  and the teacher scores them token by token (GKD, Agarwal et al. 2024; MiniLLM);
- ``sequence``: sequence-level KD (Kim and Rush 2016): the teacher answers every prompt once,
  greedily, and the student is fine-tuned on those answers. The only mode for a teacher with
  another tokenizer.

The divergence (forward KL, reverse KL or the generalised JSD at ``beta``, at a temperature) is
:mod:`instructkit.losses.distill`; ``alpha`` mixes it with the SFT cross-entropy on the same
tokens. Teacher distributions are projected a chunk of positions at a time (no (B, T, V) logits).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from instructkit.config import DistillConfig
from instructkit.stages import resolve_stage_config


class DistillLoss(nn.Module):
    """``forward`` returns (summed loss over trained tokens, their count): the divergence to the
    teacher, mixed with the student's cross-entropy by ``alpha``. The teacher is frozen and not a
    submodule (so it is neither trained, saved nor wrapped by DDP)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: DistillConfig, sampler: Callable | None = None):
        super().__init__()
        self.model = student
        self._teacher = [teacher]  # a list hides it from nn.Module's registration
        self.cfg = cfg
        self.sampler = sampler  # on_policy: batch -> batch of the student's own answers

    def forward(self, input_ids, attention_mask, labels, position_ids=None, prompt_length=None):
        from instructkit.losses.distill import chunked_divergence, distillation_loss
        from instructkit.models.lm import next_token_positions, outputs_at

        if self.sampler is not None:
            input_ids, attention_mask, labels = self.sampler(self.model, input_ids, attention_mask, prompt_length)
        positions, targets = next_token_positions(labels)
        c = self.cfg
        # Where the divergence is read: the trained positions, or (positions: all) every position
        # whose next token is a real one; `trained` picks the trained ones out of those.
        read = positions if c.positions == "answers" else real_next_token_positions(attention_mask)
        trained = positions[read]
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        student = outputs_at(self.model, read, **inputs)
        with torch.no_grad():
            teacher = outputs_at(self._teacher[0], read, **inputs)
        if self.sampler is not None:
            return self._per_answer(student, teacher, positions, targets)
        count = positions.sum()
        if student.logits is None and teacher.logits is None:
            div = chunked_divergence(
                student.hidden,
                student.weight,
                teacher.hidden,
                teacher.weight,
                beta=c.divergence_beta,
                temperature=c.temperature,
                chunk_size=c.train.loss_chunk_size,
            )
        else:
            div = _divergence(_logits(student), _logits(teacher), c).sum()
        sft = None
        if c.alpha < 1.0:
            at_answers = student if c.positions == "answers" else _select(student, trained)
            sft = (at_answers.cross_entropy(targets, c.train.loss_chunk_size), count)
        return distillation_loss((div, count), sft, alpha=c.alpha)

    def _per_answer(self, student, teacher, positions, targets):
        """On-policy answers have lengths unknown before the step, so each answer's loss is its
        mean over its tokens and the step averages answers (the count is the number of rows)."""
        import torch.nn.functional as F

        c = self.cfg
        s, t = _logits(student), _logits(teacher)
        per_token = c.alpha * _divergence(s, t, c)
        if c.alpha < 1.0:
            per_token = per_token + (1.0 - c.alpha) * F.cross_entropy(s.float(), targets, reduction="none")
        rows = torch.arange(positions.size(0), device=positions.device)[:, None].expand_as(positions)[positions]
        sums = per_token.new_zeros(positions.size(0)).index_add(0, rows, per_token)
        return (sums / positions.sum(-1).clamp(min=1)).sum(), torch.tensor(positions.size(0))


def real_next_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask of the positions whose next token is real (not padding): position t reads t + 1."""
    import torch.nn.functional as F

    real = attention_mask.bool()
    return F.pad(real[:, :-1] & real[:, 1:], (0, 1), value=False)


def _select(out, keep: torch.Tensor):
    """The outputs at the positions ``keep`` (an (N,) mask over ``out``'s positions) picks."""
    from instructkit.models.lm import PositionOutputs

    if out.logits is not None:
        return PositionOutputs(None, None, out.logits[keep])
    return PositionOutputs(out.hidden[keep], out.weight, None)


def _logits(out) -> torch.Tensor:
    return out.logits if out.logits is not None else out.hidden @ out.weight.t()


def _divergence(student_logits, teacher_logits, cfg) -> torch.Tensor:
    from instructkit.losses.distill import token_divergence

    return token_divergence(student_logits, teacher_logits, beta=cfg.divergence_beta, temperature=cfg.temperature)


def on_policy_sampler(cfg: DistillConfig, tokenizer: Any, stop_ids: list[int]) -> Callable:
    """Replace each row's answer by one the student samples now (the prompt is kept); the seed
    comes from the batch's tokens, so a resumed run samples what the uninterrupted one did."""
    from instructkit.train.rollout import sample

    pad = tokenizer.pad_token_id

    def resample(model, input_ids, attention_mask, prompt_length):
        prompts = [row[: int(n)].tolist() for row, n in zip(input_ids, prompt_length)]
        seed = int.from_bytes(hashlib.sha256(input_ids.cpu().numpy().tobytes()).digest()[:4], "little")
        rollout = sample(
            model,
            prompts,
            stop_ids=stop_ids,
            pad_id=pad,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.sample_temperature,
            seed=cfg.train.seed + seed,
        )
        rows = [p + r for p, r in zip(prompts, rollout.responses.tolist())]
        lengths = [int(n) for n in rollout.lengths.tolist()]  # the response mask is float
        width = max(len(p) + n for p, n in zip(prompts, lengths))
        ids = torch.full((len(rows), width), pad, dtype=torch.long, device=input_ids.device)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for b, (p, n) in enumerate(zip(prompts, lengths)):
            seq = rows[b][: len(p) + n]
            ids[b, : len(seq)] = torch.tensor(seq)
            mask[b, : len(seq)] = 1
            labels[b, len(p) : len(seq)] = ids[b, len(p) : len(seq)]
        return ids, mask, labels

    return resample


def _teacher_answers(cfg: DistillConfig, records: list[Any], where: str) -> list[Any]:
    """Sequence-level KD: each conversation's last assistant turn replaced by the teacher's greedy answer."""
    from instructkit.data.schema import Conversation, Message
    from instructkit.errors import InputError
    from instructkit.generation import generate
    from instructkit.models.loading import load_model_and_tokenizer

    teacher, tokenizer = load_model_and_tokenizer(cfg.teacher, merge_adapter=True)
    prompts = []
    for i, r in enumerate(records):
        if not isinstance(r, Conversation) or r.messages[-1].role != "assistant":
            raise InputError(
                "sequence distillation needs conversations ending in an assistant turn", file=where, record=i
            )
        prompts.append(r.messages[:-1])
    answers = generate(
        teacher, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.generation_batch_size
    )
    return [Conversation([*p, Message("assistant", a)], r.tools) for p, a, r in zip(prompts, answers, records)]


def check_same_vocabulary(student_tok: Any, teacher_tok: Any) -> None:
    from instructkit.errors import InputError

    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise InputError(
            "the teacher's tokenizer differs from the student's, so their token distributions cannot be "
            "compared; use mode: sequence (the teacher writes the targets)",
            field="teacher",
        )


def distill(
    config: DistillConfig | str | Path | dict | None = None,
    overrides: list[str] | None = None,
    *,
    on_step: Callable[[int], None] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Distil ``config.teacher`` into ``config.model``; returns the run summary (also summary.json)."""
    from instructkit.data.collate import lm_collate
    from instructkit.data.encoders import encode_records, real_tokens, trained_tokens
    from instructkit.generation import stop_tokens
    from instructkit.models.lm import CausalLMLoss
    from instructkit.models.loading import load_model, load_tokenizer
    from instructkit.train import engine, setup

    # 1. Config and run folder.
    cfg = resolve_stage_config(DistillConfig, "distill", config, overrides)
    stage = setup.open_run(cfg, stage="distill", overwrite=overwrite)
    if stage.finished:
        return stage.run.saved_summary()
    with stage.cleanup_on_failure():
        # 2. Data (bad records fail here), and the teacher's tokenizer against the student's.
        splits = setup.load_splits(cfg.data)
        student_tok = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        if cfg.mode != "sequence":
            check_same_vocabulary(student_tok, load_tokenizer(cfg.teacher, trust_remote_code=cfg.trust_remote_code))
        # 3. Sequence mode: the teacher answers every prompt once, then leaves.
        if cfg.mode == "sequence":
            splits = setup.Splits(
                _teacher_answers(cfg, splits.train, cfg.data.path),
                _teacher_answers(cfg, splits.val, cfg.data.val_path or cfg.data.path),
            )
        # 4. Student (with what trains) and teacher (frozen, eval mode).
        parts = setup.load_trainable(cfg, device=stage.accelerator.device)
        teacher = None
        if cfg.mode != "sequence":
            teacher = load_model(cfg.teacher, dtype="fp32", device=str(stage.accelerator.device), merge_adapter=True)
            teacher.requires_grad_(False).eval()
        # 5. Encode: assistant tokens train (on_policy keeps each prompt's length to resample after it).
        d = cfg.data
        encode = partial(encode_records, parts.tokenizer, template=d.template, max_length=d.max_length)
        problem = "no trainable examples left after encoding (all too long or without assistant turns)"
        enc = setup.encode_splits(splits, partial(encode, where=d.path), d, problem)
        if cfg.mode == "on_policy":
            for ex in enc.train:
                ex["prompt_length"] = next(i for i, label in enumerate(ex["labels"]) if label != -100)
        if cfg.mode == "sequence":
            loss_module: nn.Module = CausalLMLoss(parts.model, cfg.train.loss_chunk_size)
        else:
            stop_ids, _ = stop_tokens(parts.model, parts.tokenizer, None, d.template)
            sampler = on_policy_sampler(cfg, parts.tokenizer, stop_ids) if cfg.mode == "on_policy" else None
            loss_module = DistillLoss(parts.model, teacher, cfg, sampler)
        # 6. Train: exact token-weighted loss across micro-batches and processes.
        started = time.time()
        collate = _collate_with_prompt_length(lm_collate(parts.tokenizer.pad_token_id))
        result = engine.fit(
            loss_module=loss_module,
            model=parts.model,
            examples=enc.train,
            collate=collate,
            weight=(lambda ex: 1) if cfg.mode == "on_policy" else trained_tokens,
            length=real_tokens,
            train=cfg.train,
            optim=cfg.optim,
            run=stage.run,
            accelerator=stage.accelerator,
            val_examples=enc.val if cfg.mode != "on_policy" else [],
            on_step=on_step,
        )
    # 7. Save final/ as SFT does.
    summary = setup.stage_summary(
        "distill",
        cfg,
        parts,
        stage.run,
        teacher=cfg.teacher,
        mode=cfg.mode,
        loss=cfg.loss,
        **result.summary(started),
        val_loss=result.final_val_loss,
        train_examples=len(enc.train),
        dropped_too_long=enc.dropped,
    )
    return stage.finish(
        summary, lambda: setup.save_final(parts.model, parts.tokenizer, stage.run, base_spec=cfg.model, merged=False)
    )


def _collate_with_prompt_length(collate: Callable) -> Callable:
    def with_lengths(batch: list[dict[str, Any]]) -> dict[str, Any]:
        out = collate([{k: v for k, v in ex.items() if k != "prompt_length"} for ex in batch])
        if batch and "prompt_length" in batch[0]:
            out["prompt_length"] = torch.tensor([ex["prompt_length"] for ex in batch])
        return out

    return with_lengths
