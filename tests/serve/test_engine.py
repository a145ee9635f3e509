"""The batcher on a tiny random Llama with SmolLM2's real tokenizer: batched rows give what each
request gives alone, whatever it shares a batch with and whenever it joins."""

from __future__ import annotations

import asyncio

import pytest

from instructkit.data.templates import encode_prompt
from instructkit.generation import generate
from instructkit.serve.engine import Batcher, Choice, Piece, QueueFull, Sampling, choice_seed, held_back, pick
from tests.tiny import real_tokenizer, tiny_llama

# Prompts of different lengths, so a batch of them is left-padded.
PROMPTS = ["Hi", "Hello there, how are you today?", "Tell me a long story about " + "a cat and a dog " * 6, "x y"]


@pytest.fixture(scope="module")
def model():
    # initializer_range 0.5: varied tokens (at the default 0.02 a random model repeats "\n")
    return tiny_llama(len(real_tokenizer()), initializer_range=0.5)


def prompt_ids(text: str) -> list[int]:
    return encode_prompt(real_tokenizer(), [{"role": "user", "content": text}])


def run(model, body, **kwargs):
    """Run ``body(engine)`` in a fresh event loop with a fresh batcher, closed afterwards."""

    async def main():
        engine = Batcher(model, real_tokenizer(), **kwargs)
        try:
            return await body(engine), engine
        finally:
            engine.close()

    return asyncio.run(main())


async def texts(subs) -> list[str]:
    return [(await s.choices())[0].text for s in subs]


def test_batched_greedy_equals_generate_alone_with_a_late_joiner(model):
    tokenizer = real_tokenizer()
    ids = [prompt_ids(p) for p in PROMPTS]
    alone = [generate(model, tokenizer, [p], max_new_tokens=12, temperature=0)[0] for p in ids]
    # The third request stops at a string from the middle of its own greedy text.
    stop = alone[2][len(alone[2]) // 2 : len(alone[2]) // 2 + 2]
    alone[2] = generate(model, tokenizer, [ids[2]], max_new_tokens=12, temperature=0, stop=[stop])[0]
    assert len(set(map(len, ids))) == len(ids)

    async def body(engine):
        engine.pause()
        first = [engine.submit(ids[i], Sampling(max_new_tokens=12)) for i in (0, 1)]
        engine.resume()
        started = first[0].events()
        head = await started.__anext__()
        assert isinstance(head, Piece)  # the first two are generating
        engine.pause()
        later = [
            engine.submit(ids[2], Sampling(max_new_tokens=12, stop=(stop,))),
            engine.submit(ids[3], Sampling(max_new_tokens=12)),
        ]
        engine.resume()
        rest = [e async for e in started]
        (first_done,) = [e for e in rest if isinstance(e, Choice)]
        assert head.text + "".join(e.text for e in rest if isinstance(e, Piece)) == first_done.text
        return [first_done, *[(await s.choices())[0] for s in first[1:] + later]]

    got, engine = run(model, body)
    assert [c.text for c in got] == alone
    assert got[2].finish_reason == "stop" and got[3].finish_reason == "length"
    # The late pair joined the running pair: some step ran all four rows.
    assert max(engine.step_sizes) == 4


def test_batched_greedy_equals_generate_alone(model):
    tokenizer = real_tokenizer()
    ids = [prompt_ids(p) for p in PROMPTS]
    alone = [generate(model, tokenizer, [p], max_new_tokens=10, temperature=0)[0] for p in ids]

    async def body(engine):
        engine.pause()
        subs = [engine.submit(p, Sampling(max_new_tokens=10)) for p in ids]
        engine.resume()
        return await texts(subs)

    got, engine = run(model, body)
    assert got == alone
    assert max(engine.step_sizes) == len(ids)


def test_finished_rows_leave_the_batch(model):
    ids = [prompt_ids(p) for p in PROMPTS[:2]]

    async def body(engine):
        engine.pause()
        subs = [engine.submit(ids[0], Sampling(max_new_tokens=3)), engine.submit(ids[1], Sampling(max_new_tokens=9))]
        engine.resume()
        return [(await s.choices())[0] for s in subs]

    (short, long), engine = run(model, body)
    assert short.completion_tokens <= 3 and long.finish_reason == "length" and long.completion_tokens == 9
    # Rows x steps = tokens picked: the short row stopped costing steps once it finished.
    assert sum(size * steps for size, steps in engine.step_sizes.items()) == short.completion_tokens + 9 + (
        short.finish_reason == "stop"
    )
    assert engine.step_sizes[1] >= 9 - 3


def test_seeded_sample_is_the_same_alone_and_batched(model):
    ids = [prompt_ids(p) for p in PROMPTS]
    sampled = Sampling(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=1234)

    async def alone(engine):
        return await texts([engine.submit(ids[1], sampled)])

    async def batched(engine):
        engine.pause()
        subs = [
            engine.submit(ids[0], Sampling(max_new_tokens=12, temperature=1.0, seed=1)),
            engine.submit(ids[1], sampled),
            engine.submit(ids[2], Sampling(max_new_tokens=5)),
            engine.submit(ids[3], Sampling(max_new_tokens=12, temperature=0.7, top_p=0.5, seed=1234)),
        ]
        engine.resume()
        return await texts(subs)

    (text,), _ = run(model, alone)
    together, engine = run(model, batched)
    assert max(engine.step_sizes) == 4
    assert together[1] == text
    (other_seed,), _ = run(model, lambda e: texts([e.submit(ids[1], Sampling(**{**sampled.__dict__, "seed": 99}))]))
    assert other_seed != text  # the seed matters, so the equality above is not luck


def test_choices_of_one_request_differ_and_the_first_is_the_seed_alone(model):
    ids = prompt_ids(PROMPTS[0])
    sampled = Sampling(max_new_tokens=10, temperature=1.0, seed=7)

    async def body(engine):
        three = await engine.submit(ids, sampled, n=3).choices()
        one = await engine.submit(ids, sampled).choices()
        return three, one

    (three, one), _ = run(model, body)
    assert [c.index for c in three] == [0, 1, 2]
    assert len({c.text for c in three}) == 3
    assert three[0].text == one[0].text


def test_pieces_concatenate_to_the_choice(model):
    ids = prompt_ids(PROMPTS[1])

    async def body(engine):
        sub = engine.submit(ids, Sampling(max_new_tokens=16, temperature=1.0, seed=3), n=2)
        return [e async for e in sub.events()]

    events, _ = run(model, body)
    for index in (0, 1):
        pieces = [e.text for e in events if isinstance(e, Piece) and e.index == index]
        (done,) = [e for e in events if isinstance(e, Choice) and e.index == index]
        assert len(pieces) > 1 and "".join(pieces) == done.text


def test_full_queue_refuses_and_cancelled_requests_free_their_place(model):
    ids = prompt_ids(PROMPTS[0])

    async def body(engine):
        engine.pause()
        running = engine.submit(ids, Sampling(max_new_tokens=4))  # fits the batch of 1
        waiting = engine.submit(ids, Sampling(max_new_tokens=4))  # the one place in the queue
        with pytest.raises(QueueFull):
            engine.submit(ids, Sampling(max_new_tokens=4))
        assert engine.waiting == 2
        waiting.cancel()
        assert engine.waiting == 1  # the cancelled request left the queue at once
        engine.resume()
        done = await running.choices()
        third = await engine.submit(ids, Sampling(max_new_tokens=4)).choices()
        return done, third

    (done, third), engine = run(model, body, max_batch=1, max_queue=1)
    assert done[0].text == third[0].text  # greedy, same prompt
    assert max(engine.step_sizes) == 1 and engine.waiting == 0


def test_choice_seeds_and_held_back():
    assert choice_seed(5, 0) == 5 and choice_seed(-1, 0) == 2**63 - 1
    assert len({choice_seed(5, i) for i in range(100)}) == 100
    assert all(0 <= choice_seed(2**70, i) < 2**63 for i in range(3))
    assert held_back("hello wor", ["world"]) == 3
    assert held_back("hello", ["xyz"]) == 0
    assert held_back("ab", ["abc", "bcd"]) == 2


def generators(*seeds):
    import torch

    return [torch.Generator().manual_seed(s) for s in seeds]


def test_pick_greedy_rows_take_the_argmax_and_tiny_top_p_keeps_only_it():
    import torch

    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0], [0.0, 1.0, 5.0]])
    assert pick(logits, [0.0, 0.0, 0.0], [1.0] * 3, [None] * 3) == [1, 0, 2]
    # top_p 1e-6 keeps only the most likely token; a temperature of 1e-300 overflows to greedy.
    assert pick(logits, [1.0, 1e-300, 2.0], [1e-6, 1.0, 1e-6], generators(1, 2, 3)) == [1, 0, 2]


def test_pick_samples_each_row_from_its_own_distribution_and_generator():
    import math

    import torch

    # Row 0: p(token 1) = 3 / (1 + 3) = 0.75; token 2 has probability 0 and is never drawn.
    row = torch.tensor([0.0, math.log(3.0), float("-inf")])
    draws = [pick(row[None], [1.0], [1.0], [g])[0] for g in generators(*range(4000))]
    assert 2 not in draws
    # 4000 draws: standard error sqrt(0.75 * 0.25 / 4000) = 0.0068; 0.03 is over 4 of them.
    assert abs(draws.count(1) / 4000 - 0.75) < 0.03
    # The same generator state gives the same draw whatever the other rows are.
    other = torch.randn(3, 3)
    for seed in range(20):
        alone = pick(row[None], [1.0], [1.0], generators(seed))[0]
        batched = pick(
            torch.cat([other[:1], row[None], other[1:]]), [0.5, 1.0, 0.0], [0.9, 1.0, 1.0], generators(99, seed, 7)
        )[1]
        assert alone == batched


def test_a_cancelled_running_request_leaves_the_batch(model):
    ids = prompt_ids(PROMPTS[1])

    async def body(engine):
        gone = engine.submit(ids, Sampling(max_new_tokens=60))
        events = gone.events()
        await events.__anext__()  # it is generating
        gone.cancel()  # what the server does when the client disconnects
        stays = await engine.submit(ids, Sampling(max_new_tokens=3)).choices()
        return stays

    stays, engine = run(model, body)
    assert stays[0].completion_tokens == 3
    # The 60-token request stopped: far fewer rows were run than its 60 tokens would need.
    assert sum(size * steps for size, steps in engine.step_sizes.items()) < 30


def test_batch_and_queue_sizes_are_checked(model):
    from instructkit.errors import InputError

    with pytest.raises(InputError, match="max_batch"):
        Batcher(model, real_tokenizer(), max_batch=0)
    with pytest.raises(InputError, match="max_queue"):
        Batcher(model, real_tokenizer(), max_queue=-1)
