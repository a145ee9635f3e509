"""Vision-language recipe (LLaVA's two stages): images and instructions in, answers out.

``vision_projector``: only the projector trains (the encoder and the decoder are frozen), so
the decoder learns nothing new and the projector learns to speak its embedding language.
``vision``: the projector (from a ``vision_projector`` run, or new) and LoRA on the decoder.

Reads top to bottom: config -> image records -> model -> encode (image features once: the
encoder is frozen) -> held-out score before -> train -> held-out score after -> save final/.
The model is :class:`instructkit.models.vision.VisionLM`; placement of the image tokens and the
truncation rule are :mod:`instructkit.data.vision`'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from instructkit.config import VisionConfig, VisionProjectorConfig
from instructkit.stages import resolve_stage_config

HELDOUT_FILE = "heldout.json"  # eval/vision.HELDOUT_FILE reads it (eval/ does not import train/)


def vision_projector(
    config: VisionProjectorConfig | str | Path | dict | None = None,
    overrides: list[str] | None = None,
    *,
    on_step: Callable[[int], None] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train only the projector (the decoder frozen); returns the run summary."""
    cfg = resolve_stage_config(VisionProjectorConfig, "vision_projector", config, overrides)
    return _vision(cfg, "vision_projector", on_step, overwrite)


def vision(
    config: VisionConfig | str | Path | dict | None = None,
    overrides: list[str] | None = None,
    *,
    on_step: Callable[[int], None] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train the projector and (``decoder: lora``) LoRA on the decoder; returns the run summary."""
    cfg = resolve_stage_config(VisionConfig, "vision", config, overrides)
    return _vision(cfg, "vision", on_step, overwrite)


def _vision(cfg: VisionConfig, name: str, on_step, overwrite: bool) -> dict[str, Any]:
    from instructkit.data.vision import image_token_id, read_image_records
    from instructkit.fileio import atomic_dir, atomic_write_json
    from instructkit.models.vision import VisionLMLoss, save_vision, vision_collate
    from instructkit.train import engine, setup

    # 1. The run folder (a finished run with this config is returned as is).
    stage = setup.open_run(cfg, stage=name, overwrite=overwrite)
    if stage.finished:
        return stage.run.saved_summary()
    with stage.cleanup_on_failure():
        # 2. Records with images, every image opened: a bad record fails here, before a model loads.
        d = cfg.data
        train_records = read_image_records(d.path, d.limit)
        val_records = read_image_records(d.val_path) if d.val_path else []
        test_records = read_image_records(d.test_path, d.test_limit) if d.test_path else []

        # 3. Encoder + projector + decoder; what trains (the projector, and LoRA when decoder: lora).
        model, tokenizer, decoder_spec = build_model(cfg, stage.accelerator.device)
        image_token_id(tokenizer)

        # 4. Token ids with each image's run of tokens, and the image features (computed once).
        train_ex, train_dropped = encode(model, tokenizer, train_records, cfg)
        val_ex, val_dropped = encode(model, tokenizer, val_records, cfg)
        setup.check_encoded(train_ex, d, f"no training example fits data.max_length={d.max_length}")
        if train_dropped:
            stage.print(f"note: {train_dropped} examples longer than max_length={d.max_length} were dropped whole")

        # 5. Held-out answers before training (the starting point of the eval stage's table).
        score = lambda: heldout_scores(  # noqa: E731
            model, tokenizer, test_records, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size
        )
        before = starting_scores(stage.run.path, score, previous_heldout(cfg)) if test_records else None

        # 6. Train: exact token-weighted loss over micro-batches, checkpoints and exact resume.
        started = time.time()
        result = engine.fit(
            loss_module=VisionLMLoss(model, cfg.train.loss_chunk_size),
            model=model,
            examples=train_ex,
            collate=vision_collate(tokenizer.pad_token_id, image_token_id(tokenizer)),
            weight=lambda e: sum(t != -100 for t in e["labels"]),
            length=lambda e: len(e["input_ids"]),
            train=cfg.train,
            optim=cfg.optim,
            run=stage.run,
            accelerator=stage.accelerator,
            val_examples=val_ex,
            on_step=on_step,
        )
        after = score() if test_records else None

    # 7. Save final/ (projector, adapter, tokenizer, vision.json) and the held-out scores.
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary = {
        "stage": name,
        "model": cfg.model,
        "decoder": cfg.decoder,
        **result.summary(started),
        "val_loss": result.final_val_loss,
        "train_examples": len(train_ex),
        "val_examples": len(val_ex),
        "dropped_too_long": train_dropped + val_dropped,
        "heldout_exact_match": after["exact_match"] if after else None,
        "heldout_exact_match_before": before["exact_match"] if before else None,
        "trainable_parameters": trainable,
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "final": str(stage.run.final),
    }

    def save() -> None:
        with atomic_dir(stage.run.final) as tmp:
            save_vision(model, tokenizer, tmp, decoder_spec=decoder_spec)
        held = {"split": d.test_path, "test_limit": d.test_limit, "before": before, "after": after}
        atomic_write_json(stage.run.path / HELDOUT_FILE, held)

    return stage.finish(summary, save)


def previous_heldout(cfg: VisionConfig) -> dict[str, Any] | None:
    """The scores after training of the vision run this stage starts from, when they are of the
    same test records (then they are this stage's "before" and are not measured again)."""
    import json

    from instructkit.models.vision import vision_folder

    folder = vision_folder(cfg.model)
    path = folder.parent / HELDOUT_FILE if folder is not None else None
    if path is None or not path.is_file():
        return None
    held = json.loads(path.read_text())
    same = held.get("split") == cfg.data.test_path and held.get("test_limit") == cfg.data.test_limit
    return held.get("after") if same else None


def starting_scores(folder: Path, score: Callable[[], dict[str, Any]], known: dict[str, Any] | None) -> dict[str, Any]:
    """The held-out scores before training, measured once (``known``: already measured, by the
    stage this one starts from); a resumed run reads them back."""
    import json

    from instructkit.fileio import atomic_write_json

    path = Path(folder) / "heldout_before.json"
    if path.is_file():
        return json.loads(path.read_text())
    scores = known if known is not None else score()
    atomic_write_json(path, scores)
    return scores


def build_model(cfg: VisionConfig, device: Any):
    """(VisionLM, tokenizer, the decoder's base spec). ``cfg.model`` is a decoder, or a vision run
    whose projector (and merged adapter, if it trained one) this stage starts from."""
    from instructkit.models.loading import load_model, load_tokenizer
    from instructkit.models.peft_methods import apply_method
    from instructkit.models.vision import VisionLM, load_encoder, load_vision_model, vision_folder
    from instructkit.train.engine import set_seed

    set_seed(cfg.train.seed)
    if vision_folder(cfg.model) is not None:
        previous, tokenizer = load_vision_model(cfg.model)
        decoder = previous.decoder
        decoder = decoder.merge_and_unload() if hasattr(decoder, "merge_and_unload") else decoder
        from instructkit.models.vision import read_vision_meta

        decoder_spec = read_vision_meta(cfg.model)["decoder"]
        projector_state = previous.projector.state_dict()
        grid, size = previous.grid, previous.image_size
        template = cfg.data.template if cfg.data.template is not None else previous.template
    else:
        tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        decoder = load_model(cfg.model, dtype="fp32", device="cpu", trust_remote_code=cfg.trust_remote_code)
        decoder_spec, projector_state, grid, size = cfg.model, None, cfg.grid, cfg.image_size
        template = cfg.data.template
    decoder.requires_grad_(False)
    if cfg.decoder == "lora":
        decoder = apply_method(decoder, cfg.peft, task="CAUSAL_LM")
    model = VisionLM(load_encoder(), decoder, grid, size, template)
    if projector_state is not None:
        model.projector.load_state_dict(projector_state)
    return model.to(device), tokenizer, decoder_spec


def encode(model: Any, tokenizer: Any, records: list[Any], cfg: VisionConfig) -> tuple[list[dict[str, Any]], int]:
    """Training examples ``{"input_ids", "labels", "features"}`` and how many were dropped whole."""
    from instructkit.data.vision import encode_image_conversation
    from instructkit.models.vision import encode_images

    examples, dropped = [], 0
    for r in records:
        e = encode_image_conversation(
            tokenizer, r, tokens_per_image=model.grid**2, max_length=cfg.data.max_length, template=model.template
        )
        if e is None:
            dropped += 1
            continue
        examples.append(e)
    flat = [im for e in examples for im in e["images"]]
    feats = encode_images(model.encoder, flat, model.image_size, model.grid).cpu()  # (I, grid*grid, C)
    k = 0
    for e in examples:
        n = len(e.pop("images"))
        e["features"] = feats[k : k + n].reshape(-1, feats.shape[-1])  # (n * grid*grid, C)
        k += n
    return examples, dropped


def heldout_scores(model: Any, tokenizer: Any, records: list[Any], **generate_kwargs: Any) -> dict[str, Any]:
    """Exact match (answers stripped, nothing else normalised) over ``records`` (ImageRecords
    whose last assistant turn is the reference), per record ``kind`` too, and corpus BLEU
    (sacrebleu) of the responses; with the samples."""
    import sacrebleu

    from instructkit.generation import generate_with_images

    prompts, refs = [], []
    for r in records:
        last = max(i for i, m in enumerate(r.messages) if m["role"] == "assistant")
        prompts.append((r.messages[:last], r.images))
        refs.append(r.messages[last]["content"])
    responses = generate_with_images(model, tokenizer, prompts, **generate_kwargs)
    samples = [
        {
            "prompt": p[-1]["content"],
            "response": out,
            "reference": ref,
            "correct": out.strip() == ref.strip(),
            "kind": (r.extra or {}).get("kind"),
        }
        for (p, _), out, ref, r in zip(prompts, responses, refs, records)
    ]
    n = len(samples)
    by_kind: dict[str, list[bool]] = {}
    for s in samples:
        by_kind.setdefault(str(s["kind"]), []).append(s["correct"])
    return {
        "exact_match": sum(s["correct"] for s in samples) / n if n else 0.0,
        "bleu": sacrebleu.corpus_bleu(responses, [refs]).score if n else 0.0,
        "n": n,
        "exact_match_by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
        "samples": samples,
    }
