"""The seq2seq recipe on tiny encoder-decoders built from configs (tests/tiny.py): a BART over
MiniLM's WordPiece, a T5 over SmolLM2's BPE, and a BERT2BERT warm-started from a tiny BERT. They
train (the loss falls), final/ reloads and generates what the trained model generated, the
engine invariants hold, the loss equals transformers' Seq2SeqTrainer step by step, the warm
start keeps the BERT's weights where Rothe et al. keep them (cross-attention copied from self-attention), and bad input is a located error
found before a model loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from instructkit.errors import InputError
from instructkit.train.seq2seq import seq2seq
from tests.tiny import (
    tiny_bart_dir,
    tiny_bert_encoder_dir,
    tiny_t5_dir,
    toy_conversations,
    write_jsonl,
)
from tests.train.invariants import assert_accumulation_is_exact, assert_resumes_exactly, losses, trl_parity_args

LR = 3e-3  # a 32-wide random model moves within 30 steps at this rate
PROMPTS = [[{"role": "user", "content": c["messages"][0]["content"]}] for c in toy_conversations(6)]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seq2seq_models")
    return {
        "bart": tiny_bart_dir(root / "bart"),
        "t5": tiny_t5_dir(root / "t5"),
        "bert": tiny_bert_encoder_dir(root / "bert"),
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("seq2seq_data") / "train.jsonl", toy_conversations(32))


def config(model: Path, data: Path, out: Path, **train) -> dict:
    return {
        "model": str(model),
        "out": str(out),
        "data": {"path": str(data), "val_fraction": 0.0, "max_source_length": 32, "max_target_length": 16},
        "optim": {"lr": LR, "scheduler": "constant"},
        "train": {"batch_size": 8, "max_steps": 6, "progress": False, "seed": 0, **train},
    }


# ----------------------------------------------------------------------------------------------
# Training, saving, generating


@pytest.mark.parametrize("kind", ["bart", "t5"])
def test_trains_and_final_reloads_and_generates_the_same(models, data, tmp_path, kind):
    """30 steps on reversed words: the loss falls by a third; final/ loads as the same class
    through the ordinary model spec (the run folder) and greedy answers equal the in-memory
    trained model's answers."""
    import transformers

    from instructkit.generation import generate
    from instructkit.models.loading import load_model_and_tokenizer

    summary = seq2seq(config(models[kind], data, tmp_path / "run", max_steps=30))
    curve = losses(tmp_path / "run")
    assert summary["steps"] == 30 and summary["warm_start"] is None
    assert curve[-1] < curve[0] * 2 / 3, curve
    model, tokenizer = load_model_and_tokenizer(tmp_path / "run", device="cpu")
    expected = {"bart": transformers.BartForConditionalGeneration, "t5": transformers.T5ForConditionalGeneration}
    assert isinstance(model, expected[kind])
    answers = generate(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=4)
    alone = [generate(model, tokenizer, [p], max_new_tokens=8, batch_size=1)[0] for p in PROMPTS]
    assert answers == alone  # right padding of the encoder inputs changes no answer
    assert all(isinstance(a, str) for a in answers) and any(answers)


def test_generation_equals_hf_generate_alone(models):
    """A batch of unequal prompts answers as HF's own ``generate`` on each prompt alone (from the
    source text, cut at [SEP])."""
    import torch

    from instructkit.data.seq2seq import encode_source
    from instructkit.generation import generate
    from instructkit.models.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(models["bart"], device="cpu")
    ours = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=8)
    for prompt, answer in zip(PROMPTS, ours):
        ids = torch.tensor([encode_source(tokenizer, prompt)])
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, eos_token_id=102, pad_token_id=0)
        row = out[0, 1:].tolist()
        row = row[: row.index(102)] if 102 in row else row
        assert answer == tokenizer.decode(row, skip_special_tokens=True)


def test_lora_trains_and_merges_into_final(models, data, tmp_path):
    from instructkit.models.loading import load_model_and_tokenizer

    cfg = config(models["bart"], data, tmp_path / "run", max_steps=10)
    cfg["peft"] = {"method": "lora", "r": 4, "alpha": 8}
    summary = seq2seq(cfg)
    assert summary["trainable_parameters"] < summary["total_parameters"] / 2
    assert not (tmp_path / "run" / "final" / "adapter_config.json").exists()  # merged: plain weights
    model, _ = load_model_and_tokenizer(tmp_path / "run", device="cpu")
    assert not hasattr(model, "peft_config")
    curve = losses(tmp_path / "run")
    assert curve[-1] < curve[0]


@pytest.mark.parametrize("kind", ["bart", "t5"])
def test_gradient_accumulation_is_exact(models, data, tmp_path, kind):
    assert_accumulation_is_exact(seq2seq, lambda out, **train: config(models[kind], data, out, **train), tmp_path)


@pytest.mark.parametrize("kind", ["bart", "t5", "bert"])
def test_interrupted_run_resumes_exactly(models, data, tmp_path, kind):
    assert_resumes_exactly(seq2seq, lambda out, **train: config(models[kind], data, out, **train), tmp_path)


# ----------------------------------------------------------------------------------------------
# Parity with transformers' Seq2SeqTrainer


def test_loss_matches_transformers_seq2seq_trainer(models, data, tmp_path):
    """The same tiny BART, the same 8 encoded examples as one full batch every step (so the data
    order cannot differ), AdamW at a constant lr without warm-up, clipping 1, no dropout: our
    per-step loss (sum over target tokens / their number) and the Seq2SeqTrainer's (BART's own
    mean cross-entropy from ``labels=``, decoder inputs made by DataCollatorForSeq2Seq) agree
    within 1e-5 for 10 steps."""
    import transformers
    from datasets import Dataset

    from instructkit.data.formats import load_records
    from instructkit.data.seq2seq import encode_seq2seq

    small = write_jsonl(tmp_path / "eight.jsonl", toy_conversations(8))
    cfg = config(models["bart"], small, tmp_path / "ours", max_steps=10)
    cfg["optim"]["lr"] = 1e-3
    ours = seq2seq(cfg)
    assert ours["steps"] == 10
    ours_curve = losses(tmp_path / "ours")

    tokenizer = transformers.AutoTokenizer.from_pretrained(models["bart"])
    records = load_records(small).records
    encoded, dropped = encode_seq2seq(
        tokenizer, records, decoder_start_id=101, eos_id=102, max_source_length=32, max_target_length=16
    )
    assert dropped == 0 and len(encoded) == 8
    model = transformers.BartForConditionalGeneration.from_pretrained(models["bart"])
    args = transformers.Seq2SeqTrainingArguments(**trl_parity_args(tmp_path / "hf"), seed=0, disable_tqdm=True)
    trainer = transformers.Seq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(encoded),
        data_collator=transformers.DataCollatorForSeq2Seq(tokenizer, model=model),
    )
    trainer.train()
    hf_curve = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(hf_curve) == len(ours_curve) == 10
    assert ours_curve[0] - ours_curve[-1] > 0.01  # it moved (1000 x the tolerance)
    for step, (a, b) in enumerate(zip(ours_curve, hf_curve), 1):
        assert a == pytest.approx(b, abs=1e-5), f"step {step}: ours {a}, Seq2SeqTrainer {b}"


# ----------------------------------------------------------------------------------------------
# BERT2BERT


def test_warm_start_keeps_the_bert_weights_and_adds_cross_attention(models):
    """Rothe et al. 2020, section 3: the encoder is the BERT checkpoint; the decoder is the same
    checkpoint (embeddings, self-attention, feed-forward, layer norms) with is_decoder and a
    cross-attention block per layer that the checkpoint does not have (here a copy of the layer's
    self-attention, not tied to it; the paper draws it at random); decoding starts at
    [CLS], ends at [SEP], pads with [PAD]. Built twice with one seed, the new weights agree."""
    import torch
    from transformers import BertModel

    from instructkit.models.seq2seq import special_ids, warm_start

    bert = BertModel.from_pretrained(models["bert"]).state_dict()
    model, tokenizer = warm_start(str(models["bert"]), seed=7)
    encoder = model.encoder.state_dict()
    decoder = {k.removeprefix("bert."): v for k, v in model.decoder.state_dict().items()}
    shared = [k for k in bert if not k.startswith("pooler.")]
    for key in shared:
        assert torch.equal(encoder[key], bert[key]), key
        assert torch.equal(decoder[key], bert[key]), key
    cross = [k for k in decoder if "crossattention" in k]
    # 2 layers x (query, key, value and output dense: weight and bias; the output LayerNorm: 2) = 2 x 10
    assert len(cross) == 2 * 10
    assert not any("crossattention" in k for k in bert)
    for key in cross:  # each a copy of its layer's pretrained self-attention (query ... output LayerNorm)
        assert torch.equal(decoder[key], bert[key.replace("crossattention", "attention")]), key
    layer0 = model.decoder.bert.encoder.layer[0]
    assert layer0.crossattention.self.query.weight.data_ptr() != layer0.attention.self.query.weight.data_ptr()
    assert model.config.decoder.is_decoder and model.config.decoder.add_cross_attention
    assert special_ids(model) == (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
    again, _ = warm_start(str(models["bert"]), seed=7)
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_bert2bert_stage_saves_a_model_that_reloads_with_its_record(models, data, tmp_path):
    import torch

    from instructkit.generation import generate
    from instructkit.models.loading import load_model_and_tokenizer
    from instructkit.models.seq2seq import starting_model, warm_start, warm_start_record

    summary = seq2seq(config(models["bert"], data, tmp_path / "run", max_steps=4))
    assert summary["warm_start"] == str(models["bert"])
    assert warm_start_record(str(tmp_path / "run")) == {"warm_start": str(models["bert"]), "seed": 0}
    model, tokenizer = load_model_and_tokenizer(tmp_path / "run", device="cpu")
    assert type(model).__name__ == "EncoderDecoderModel"
    assert any(generate(model, tokenizer, PROMPTS, max_new_tokens=4))
    # the eval stage's first row: the untrained warm start the run began with, built again
    untrained, _ = starting_model(str(models["bert"]), [str(tmp_path / "run")])
    original, _ = warm_start(str(models["bert"]), seed=0)
    for key, value in original.state_dict().items():
        assert torch.equal(untrained.state_dict()[key].cpu(), value), key
    assert starting_model(str(models["bart"]), [str(tmp_path / "run")]) is None


# ----------------------------------------------------------------------------------------------
# Eval: generation suites on a seq2seq run, and the recipe's table


def test_eval_scores_a_seq2seq_run_from_the_source_text(models, data, tmp_path):
    """`instructkit eval` on a seq2seq run folder: the response to each held-out record is the
    model's answer to the record's source text (what ``generate`` gives it), scored by
    exact_match and bleu."""
    from instructkit.eval.run import evaluate
    from instructkit.generation import generate
    from instructkit.models.loading import load_model_and_tokenizer

    seq2seq(config(models["bart"], data, tmp_path / "run", max_steps=20))
    test = write_jsonl(tmp_path / "test.jsonl", toy_conversations(8))
    result = evaluate(model=str(tmp_path / "run"), suites=["exact_match", "bleu"], data=str(test), max_new_tokens=8)
    model, tokenizer = load_model_and_tokenizer(tmp_path / "run", device="cpu")
    prompts = [[{"role": "user", "content": c["messages"][0]["content"]}] for c in toy_conversations(8)]
    expected = generate(model, tokenizer, prompts, max_new_tokens=8)
    assert [s["response"] for s in result["samples"]] == expected
    assert 0.0 <= result["metrics"]["exact_match"] <= 1.0 and "bleu" in result["metrics"]


def test_recipe_seq2seq_then_eval_starts_from_the_untrained_warm_start(models, data, tmp_path):
    """A recipe from the tiny BERT: seq2seq (BERT2BERT) -> eval. The table has the base row and
    the trained row; the base row's answers are the untrained warm start's, not the BERT's
    (which is no generator)."""
    from instructkit.generation import generate
    from instructkit.models.seq2seq import warm_start
    from instructkit.pipeline import run

    test = write_jsonl(tmp_path / "test.jsonl", toy_conversations(4))
    recipe = tmp_path / "recipe.yaml"
    section = config(models["bert"], data, tmp_path / "unused", max_steps=3)
    del section["model"], section["out"]
    recipe.write_text(
        json.dumps(
            {
                "name": "s2s",
                "model": str(models["bert"]),
                "stages": ["seq2seq", "eval"],
                "seq2seq": section,
                "eval": {"suites": ["exact_match", "bleu"], "data": str(test), "max_new_tokens": 4},
            }
        )
    )
    summary = run(recipe, out=tmp_path / "runs")
    assert set(summary["table"]) == {"base", "seq2seq"}
    assert (tmp_path / "runs" / "report.html").is_file()
    base = [json.loads(line) for line in (tmp_path / "runs" / "eval" / "base.samples.jsonl").read_text().splitlines()]
    untrained, tokenizer = warm_start(str(models["bert"]), seed=0)
    prompts = [[{"role": "user", "content": c["messages"][0]["content"]}] for c in toy_conversations(4)]
    assert [s["response"] for s in base] == generate(untrained, tokenizer, prompts, max_new_tokens=4)


# ----------------------------------------------------------------------------------------------
# Bad input


def test_preference_data_is_refused_before_a_model_loads(models, tmp_path):
    rows = [
        {"prompt": "hi", "chosen": "a", "rejected": "b"},
        {"prompt": "yo", "chosen": "c", "rejected": "d"},
    ]
    prefs = write_jsonl(tmp_path / "prefs.jsonl", rows)
    with pytest.raises(InputError, match="instruction data") as err:
        seq2seq(config(models["bart"], prefs, tmp_path / "run"))
    assert err.value.file == str(prefs) and err.value.record == 0
    assert not (tmp_path / "run").exists()


def test_an_encoder_without_warm_start_is_refused(models, data, tmp_path):
    cfg = config(models["bert"], data, tmp_path / "run")
    cfg["warm_start"] = False
    with pytest.raises(InputError, match="not an encoder-decoder") as err:
        seq2seq(cfg)
    assert err.value.field == "warm_start"
    cfg = config(models["bart"], data, tmp_path / "run2")
    cfg["warm_start"] = True
    with pytest.raises(InputError, match="already an encoder-decoder"):
        seq2seq(cfg)


def test_cli_exits_2_on_an_untrainable_method_and_an_unknown_key(models, data, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({**config(models["bart"], data, tmp_path / "run"), "peft": {"method": "ia3"}}))
    proc = subprocess.run(
        [sys.executable, "-m", "instructkit", "seq2seq", "--config", str(bad)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "peft.method" in proc.stderr and "ia3" in proc.stderr
    typo = tmp_path / "typo.yaml"
    typo.write_text(json.dumps({**config(models["bart"], data, tmp_path / "run"), "warmstart": True}))
    proc = subprocess.run(
        [sys.executable, "-m", "instructkit", "seq2seq", "--config", str(typo)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "warm_start" in proc.stderr  # did you mean
