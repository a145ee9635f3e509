"""Running the model for the server: whole responses through :func:`instructkit.generation.generate`,
and streamed ones token by token, plus the one-at-a-time queue in front of both.

A streamed response runs the same ``model.generate`` call as ``generate`` (same stops, same
sampling, same seeding), with a ``TextIteratorStreamer`` in a thread; so greedy streamed text
equals the whole response, piece for piece concatenated.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from instructkit.generation import _left_pad, _stops


class QueueFull(Exception):
    """More requests are waiting for the model than the server accepts."""


class OneAtATime:
    """Lets one request use the model at a time; at most ``max_queue`` others may wait.

    Call :meth:`admit` before answering (it raises :class:`QueueFull` at once, so the client
    gets a 503 instead of a long wait), then hold :meth:`turn` while generating.
    """

    def __init__(self, max_queue: int) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.max_queue = max_queue
        self.lock = asyncio.Lock()
        self.waiting = 0

    def admit(self) -> None:
        if self.lock.locked() and self.waiting >= self.max_queue:
            raise QueueFull(f"the server is busy: {self.waiting} requests already waiting (max_queue={self.max_queue})")
        self.waiting += 1

    @asynccontextmanager
    async def turn(self):
        try:
            await self.lock.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self.lock.release()


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that could still grow into a stop string."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


class TextStream:
    """Text pieces of one response as the model produces them, cut before the first stop string.

    Iterate it (each ``next`` blocks until the model has produced more text); :meth:`close`
    stops generation early and waits for the generating thread, so the model is free again.
    """

    def __init__(self, model: Any, tokenizer: Any, prompt_ids: list[int], *, max_new_tokens: int,
                 temperature: float, top_p: float, seed: int, stop: Sequence[str] | None) -> None:
        from transformers import TextIteratorStreamer

        stop_ids, self.stop_strings = _stops(model, tokenizer, stop, None)
        self._cancel = threading.Event()
        self._error: BaseException | None = None
        self._streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._thread = threading.Thread(
            target=self._run, daemon=True,
            args=(model, tokenizer, prompt_ids, stop_ids, max_new_tokens, temperature, top_p, seed),
        )
        self._thread.start()
        self.text = ""  # the response so far, stop strings cut
        self._pieces = self._cut_pieces()

    def _run(self, model, tokenizer, prompt_ids, stop_ids, max_new_tokens, temperature, top_p, seed) -> None:
        # Mirrors instructkit.generation.generate for one prompt, so both give the same text.
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        cancel = self._cancel

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

        added = set(tokenizer.get_added_vocab())
        watch = [s for s in self.stop_strings if s not in added]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
        device = next(model.parameters()).device
        sampling = ({"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
                    if temperature > 0 else {"do_sample": False})
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                input_ids, attention_mask = _left_pad([prompt_ids], pad_id, device)  # (1, T)
                model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                               eos_token_id=stop_ids, pad_token_id=pad_id, repetition_penalty=1.0,
                               stop_strings=watch or None, tokenizer=tokenizer if watch else None,
                               streamer=self._streamer, stopping_criteria=StoppingCriteriaList([Cancelled()]),
                               **sampling)
        except BaseException as exc:  # shown to the reader of the stream, not lost in the thread
            self._error = exc
            self._streamer.end()
        finally:
            model.train(was_training)

    def _cut_pieces(self) -> Iterator[str]:
        raw, sent = "", 0
        for piece in self._streamer:
            raw += piece
            cut = min((j for j in (raw.find(s) for s in self.stop_strings) if j >= 0), default=-1)
            if cut >= 0:
                self._cancel.set()
                yield from self._emit(raw[sent:cut])
                return
            safe = len(raw) - held_back(raw, self.stop_strings)
            if safe > sent:
                yield from self._emit(raw[sent:safe])
                sent = safe
        if self._error is not None:
            raise self._error
        yield from self._emit(raw[sent:])

    def _emit(self, piece: str) -> Iterator[str]:
        if piece:
            self.text += piece
            yield piece

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._cancel.set()
        self._thread.join()
