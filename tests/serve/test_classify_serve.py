"""``POST /classify`` on tiny BERT classify runs (a 2-layer, 32-wide BERT with MiniLM's tokenizer,
trained a few steps by the classify recipe): the served probabilities are the softmax of the
head's logits on the input as the classify stage renders it, the labels are the eval path's
predictions, a tagger's spans are seqeval's entities of its tags, and errors have the other
endpoints' shape and statuses."""

from __future__ import annotations

import random
import threading
import time

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from instructkit.serve import create_app
from instructkit.serve.classify import ServedInputs, bio_spans, classifier_task, load_classifier, split_words
from tests.serve.test_server import assert_openai_error
from tests.tiny import real_tokenizer, tiny_llama, write_jsonl
from tests.train.test_classify import config, sentences, tickets, tiny_bert_dir

COLOUR = "Which colour is it?"
SIZE = "Which size is it?"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    from instructkit.train.classify import classify

    root = tmp_path_factory.mktemp("classify_serve")
    bert = tiny_bert_dir(root / "bert")
    seq = root / "seq"
    classify(config(bert, write_jsonl(root / "seq.jsonl", tickets(8)), seq, "seq_classification", max_steps=6))
    tok = root / "tok"
    classify(config(bert, write_jsonl(root / "tok.jsonl", sentences(32)), tok, "token_classification", max_steps=6))
    return {"seq": seq, "tok": tok}


def served(run, **kwargs) -> TestClient:
    task = classifier_task(str(run))
    model, tokenizer = load_classifier(str(run), task)
    return TestClient(create_app(model, tokenizer, str(run), **kwargs))


@pytest.fixture(scope="module")
def seq_client(runs):
    with served(runs["seq"]) as c:
        yield c


@pytest.fixture(scope="module")
def tok_client(runs):
    with served(runs["tok"]) as c:
        yield c


def post(client, **body):
    return client.post("/classify", json=body)


# ------------------------------------------------------------------------------------------------
# Classifier


def test_probs_are_the_softmax_of_the_head_on_the_pair_and_labels_the_eval_paths(seq_client, runs):
    """The reference is computed apart from the server: each input alone (no padding) as BERT's
    pair ``[CLS] instruction [SEP] text [SEP]`` (the run's template), softmax of the logits; the
    labels are :func:`instructkit.models.heads.predict` on the classify stage's own encoding."""
    import torch

    from instructkit.config import ClassifyConfig, load_config
    from instructkit.data.tasks import LabelSet, read_classification
    from instructkit.models.heads import classifier_collate, predict
    from instructkit.train.classify import TaskData, encode_data

    model, tokenizer = load_classifier(str(runs["seq"]), "seq_classification")
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    rows = tickets(12)[8:]  # unseen box numbers, both instructions
    held = write_jsonl(runs["seq"].parent / "seq_test.jsonl", rows)
    cfg = load_config(ClassifyConfig, runs["seq"] / "config.yaml")
    enc = encode_data(cfg, False, tokenizer, TaskData([], [], read_classification(held), LabelSet(tuple(labels))))
    with torch.no_grad():
        predicted = predict(model, enc.held_out, classifier_collate(tokenizer.pad_token_id), batch_size=16)
    for instruction in (COLOUR, SIZE):
        mine = [(i, r) for i, r in enumerate(rows) if r["instruction"] == instruction]
        r = post(seq_client, input=[row["text"] for _, row in mine], instruction=instruction)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and body["id"].startswith("classify-") and body["model"] == str(runs["seq"])
        tokens = 0
        for item, (i, row) in zip(body["data"], mine, strict=True):
            pair = tokenizer(instruction, row["text"], return_tensors="pt")
            tokens += pair["input_ids"].shape[1]
            with torch.no_grad():
                expected = model(**pair).logits[0].softmax(-1)
            assert item["num_classes"] == len(labels) == 4
            assert torch.allclose(torch.tensor(item["probs"]), expected, atol=1e-6, rtol=0)
            assert item["label"] == labels[predicted[i]] == labels[int(expected.argmax())]
            assert set(item) == {"index", "label", "probs", "num_classes"}
        assert [item["index"] for item in body["data"]] == list(range(len(mine)))
        assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}


def test_a_single_string_input_gives_one_item(seq_client):
    r = post(seq_client, input="a small red box number 99", instruction=COLOUR)
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 1 and sum(r.json()["data"][0]["probs"]) == pytest.approx(1.0, abs=1e-5)


def test_several_training_instructions_make_the_instruction_required(seq_client):
    error = assert_openai_error(post(seq_client, input="a small red box"), 400, param="instruction")
    assert COLOUR in error["message"] and SIZE in error["message"]


def test_the_default_instruction_is_the_runs_only_one():
    assert ServedInputs("pair", ("Only this?",)).instruction(None) == "Only this?"
    assert ServedInputs("pair", ()).instruction(None) is None  # trained on texts alone
    assert ServedInputs("pair", None).instruction(None) is None  # no run folder: the text alone
    assert ServedInputs("pair", ("A?", "B?")).instruction("B?") == "B?"
    assert ServedInputs("pair", ("A?",)).instruction("  ") is None  # blank: none, as the readers take it
    with pytest.raises(Exception, match="2 instructions"):
        ServedInputs("pair", ("A?", "B?")).instruction(None)


def test_the_run_folder_tells_template_and_instructions(runs):
    from instructkit.serve.classify import served_inputs

    assert served_inputs(str(runs["seq"])) == ServedInputs("pair", (COLOUR, SIZE))
    assert served_inputs(str(runs["seq"] / "final")) == ServedInputs("pair", (COLOUR, SIZE))
    assert served_inputs(str(runs["tok"])) == ServedInputs("pair", ())


# ------------------------------------------------------------------------------------------------
# Tagger


def test_tags_are_the_eval_paths_and_spans_seqevals_entities(tok_client, runs):
    import torch
    from seqeval.metrics.sequence_labeling import get_entities

    from instructkit.data.tasks import LabelSet, TaggedTokens, encode_tagged_record
    from instructkit.models.heads import classifier_collate, predict

    model, tokenizer = load_classifier(str(runs["tok"]), "token_classification")
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    rows = sentences(8) + [{"tokens": ["Omar", "met", "Lena", "in", "Quito", "."], "tags": ["O"] * 6}]
    texts = [" ".join(r["tokens"]) for r in rows]
    label_set = LabelSet(tuple(labels))
    # Tags are not read from the references: encode with all-O tags to get the eval path's encoding.
    records = [TaggedTokens(tuple(r["tokens"]), ("O",) * len(r["tokens"])) for r in rows]
    encoded = [encode_tagged_record(tokenizer, rec, label_set, align="first") for rec in records]
    with torch.no_grad():
        predicted = predict(model, encoded, classifier_collate(tokenizer.pad_token_id), batch_size=16)
    r = post(tok_client, input=texts)
    assert r.status_code == 200, r.text
    for item, text, row, ids in zip(r.json()["data"], texts, rows, predicted, strict=True):
        assert set(item) == {"index", "num_classes", "tokens", "entities"} and item["num_classes"] == len(labels)
        assert [t["text"] for t in item["tokens"]] == row["tokens"]
        assert all(text[t["start"] : t["end"]] == t["text"] for t in item["tokens"])
        tags = [t["label"] for t in item["tokens"]]
        assert tags == [labels[i] for i in ids]
        expected = [
            {"entity": kind, "start": item["tokens"][a]["start"], "end": item["tokens"][b]["end"]}
            for kind, a, b in get_entities(tags)
        ]
        assert [{k: e[k] for k in ("entity", "start", "end")} for e in item["entities"]] == expected
        for e in item["entities"]:
            assert e["text"] == text[e["start"] : e["end"]] and 0 < e["score"] <= 1


def test_bio_spans_are_seqevals_entities():
    """Hand cases, then 2000 random BIO sequences against seqeval's ``get_entities`` (conlleval)."""
    from seqeval.metrics.sequence_labeling import get_entities

    assert bio_spans(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    assert bio_spans(["I-PER", "I-PER", "B-PER"]) == [("PER", 0, 1), ("PER", 2, 2)]  # I after O starts one
    assert bio_spans(["B-PER", "I-LOC", "O"]) == [("PER", 0, 0), ("LOC", 1, 1)]  # another type starts one
    assert bio_spans(["O", "O"]) == []
    rng = random.Random(0)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    for _ in range(2000):
        seq = [rng.choice(tags) for _ in range(rng.randint(1, 9))]
        assert bio_spans(seq) == [tuple(e) for e in get_entities(seq)], seq


def test_words_are_split_with_their_offsets():
    text = "O'Neil e-mailed Acme, Inc.  at 9am"
    words = split_words(text)
    assert [w.text for w in words] == ["O'Neil", "e-mailed", "Acme", ",", "Inc", ".", "at", "9am"]
    assert [(w.start, w.end) for w in words] == [
        (0, 6),
        (7, 15),
        (16, 20),
        (20, 21),
        (22, 25),
        (25, 26),
        (28, 30),
        (31, 34),
    ]


# ------------------------------------------------------------------------------------------------
# Errors, in the shape and with the statuses of the other endpoints


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "input"),
        ({"input": []}, "input"),
        ({"input": ["fine", "  "]}, "input"),
        ({"input": 3}, "input"),
        ({"input": "x", "instruction": COLOUR, "truncate_prompt_tokens": 8}, "truncate_prompt_tokens"),
    ],
)
def test_bad_bodies_are_400(seq_client, body, param):
    error = assert_openai_error(seq_client.post("/classify", json=body), 400)
    assert error["param"] is not None and error["param"].startswith(param)


def test_unknown_model_is_404(seq_client):
    error = assert_openai_error(post(seq_client, model="other", input="x", instruction=COLOUR), 404)
    assert error["code"] == "model_not_found"


def test_too_long_an_input_is_400(seq_client):
    r = post(seq_client, input=["fine", "word " * 200], instruction=COLOUR)  # the tiny BERT has 128 positions
    error = assert_openai_error(r, 400, param="input[1]")
    assert "128" in error["message"]


def test_api_key(runs):
    with served(runs["seq"], api_key="sekret") as c:
        body = {"input": "a red box", "instruction": COLOUR}
        assert assert_openai_error(c.post("/classify", json=body), 401)["code"] == "invalid_api_key"
        r = c.post("/classify", json=body, headers={"Authorization": "Bearer sekret"})
        assert r.status_code == 200, r.text


def test_503_when_the_queue_is_full(runs):
    with served(runs["seq"], max_queue=0) as c:
        service = c.app.state.classifier
        body = {"input": "a red box", "instruction": COLOUR}
        service.pause()  # the first request is admitted and waits for the model
        first: list = []
        sender = threading.Thread(target=lambda: first.append(c.post("/classify", json=body)))
        sender.start()
        try:
            while service.waiting == 0:
                time.sleep(0.01)
            error = assert_openai_error(c.post("/classify", json=body), 503)
            assert error["type"] == "server_error" and error["code"] == "server_busy"
        finally:
            service.resume()
            sender.join()
        assert first[0].status_code == 200
        assert c.post("/classify", json=body).status_code == 200


def test_a_classifier_does_not_answer_completions(seq_client):
    r = seq_client.post("/v1/completions", json={"prompt": "Hello"})
    error = assert_openai_error(r, 400, param="model")
    assert error["code"] == "model_not_generative" and "/classify" in error["message"]
    r = seq_client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert assert_openai_error(r, 400)["code"] == "model_not_generative"


def test_a_generator_does_not_answer_classify():
    model = tiny_llama(len(real_tokenizer()))
    with TestClient(create_app(model, real_tokenizer(), "tiny")) as c:
        error = assert_openai_error(c.post("/classify", json={"input": "hello"}), 400, param="model")
        assert error["code"] == "model_not_classifier" and "/v1/completions" in error["message"]


def test_the_served_spec_says_what_it_is(runs):
    assert classifier_task(str(runs["seq"])) == "seq_classification"
    assert classifier_task(str(runs["tok"] / "final")) == "token_classification"
    assert classifier_task("smollm2-135m-instruct") is None


def test_openapi_documents_classify(seq_client):
    operation = seq_client.get("/openapi.json").json()["paths"]["/classify"]["post"]
    assert {"200", "400", "401", "404", "503"} <= set(operation["responses"])
    assert "422" not in operation["responses"]
