"""Running the model for the server: a scheduler that batches concurrent requests.

What it owns:

* **Admission.** :meth:`Batcher.submit` queues a request's ``n`` rows (one per choice) or raises
  :class:`QueueFull` at once when the batch is full and ``max_queue`` requests already wait, so
  the client gets a 503 instead of a long wait.
* **Continuous batching.** One worker thread owns the model. Each step it (1) prefills the rows
  that arrived, as one left-padded batch, and merges their KV cache into the running batch (the
  narrower cache is padded on the left, so every row's next token stays in the last column);
  (2) picks every row's next token with that row's own temperature, top_p and generator;
  (3) sends each row's new text to its request and drops finished or cancelled rows (and the
  cache columns no remaining row uses); (4) runs one decode step for the rows left. A request
  that arrives while others generate joins at the next step; it does not wait for the batch.
* **Reproducibility.** Each row samples from its own ``torch.Generator`` seeded from the request's
  seed and the choice index, so a seeded request gives the same text alone or batched with
  anything (up to the float rounding of a differently shaped matmul, which could only matter
  when two tokens are exactly tied).
* **peft prompt learning.** A prompt-tuning or p-tuning adapter's virtual-token embeddings go in
  front of each row's prompt, after its left padding; a prefix-tuning adapter's keys and values
  go in front of each row's cache, with the prompt's positions offset past them. Each row then
  sees what ``PeftModelForCausalLM.generate`` gives that prompt alone (:class:`VirtualTokens`).
  Other prompt-learning methods are refused when the batcher is made.
* **Named LoRA adapters.** With :class:`LoraAdapters`, each request names an adapter (or the
  base) and its rows run with it inside the same batch: the base layers see every row, each LoRA
  only its own rows (peft's mixed-adapter batches, ``adapter_names=[...]``, ``"__base__"`` for the
  base). Adapters load and unload between steps; one being unloaded takes no new requests and is
  removed once its rows have finished.
* **Text.** The same stopping rules as :func:`instructkit.generation.generate` (eos, end-of-turn,
  ``stop`` strings; its ``decode_response`` makes the final text), so a greedy row gives the text
  ``generate`` gives for that prompt alone. Streamed pieces hold back any tail that could still
  become a stop string or is half a UTF-8 character; they concatenate to the final text.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from instructkit.data.templates import encode_prompt
from instructkit.errors import InputError
from instructkit.generation import decode_response, left_pad, stop_tokens

DEFAULT_MAX_BATCH = 8


class QueueFull(Exception):
    """More requests are waiting for the model than the server accepts."""


class EngineError(Exception):
    """Generation failed inside the worker (the message says why); the request cannot be answered."""


@dataclass(frozen=True)
class Sampling:
    """How one request is decoded; every choice of the request shares it."""

    max_new_tokens: int
    temperature: float = 0.0  # 0 is greedy
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Piece:
    """New text of choice ``index``."""

    index: int
    text: str


@dataclass(frozen=True)
class Choice:
    """A finished choice: its whole text, why it ended and how many tokens it generated."""

    index: int
    text: str
    finish_reason: str  # "stop" (eos, end of turn or a stop string) or "length" (max_new_tokens)
    completion_tokens: int  # generated tokens, a final eos / end-of-turn token not counted
    token_ids: tuple[int, ...] = ()  # the generated ids, a final stop token included


def choice_seed(seed: int, index: int) -> int:
    """The generator seed of choice ``index``: choice 0 uses ``seed`` itself (so ``n=1`` and the
    first of ``n=4`` agree), the others a splitmix64 mix of (seed, index)."""
    seed %= 2**63
    if index == 0:
        return seed
    z = (seed + index * 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) % 2**63


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that could still grow into a stop string."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


def pick(logits: Any, temperature: Sequence[float], top_p: Sequence[float], generators: Sequence[Any]) -> list[int]:
    """Each row's next token from ``logits`` (B, V): argmax where its temperature is 0, else a
    sample after temperature and nucleus (top_p) filtering as transformers' warpers do it (no
    top-k), drawn with the Gumbel-max trick from V uniforms of the row's own generator.

    A row's draw depends only on its logits and its generator, never on the other rows, which
    is what makes a seeded request the same alone and batched. Gumbel-max rather than inverse
    CDF because a batch of another size computes logits that differ in the last float bits: an
    inverse-CDF draw over 49k tokens lands within such a difference of a boundary every few
    dozen tokens, while the top two Gumbel-perturbed scores are almost never that close.
    Naive equivalent per row (the same distribution, a different draw)::

        probs = top_p_filter(logits[b] / temperature[b]).softmax(-1)
        torch.multinomial(probs, 1, generator=generators[b])
    """
    import torch

    tokens = logits.argmax(dim=-1)  # (B,)
    sampled = [b for b, t in enumerate(temperature) if t > 0]
    if not sampled:
        return tokens.tolist()
    index = torch.tensor(sampled, device=logits.device)
    temp = torch.tensor([temperature[b] for b in sampled], dtype=logits.dtype, device=logits.device)[:, None]
    scores = logits[index] / temp  # (S, V)
    # A temperature so small that the scores overflow: use its limit, greedy.
    overflow = torch.isnan(scores).any(dim=-1) | torch.isposinf(scores).any(dim=-1)  # (S,)
    scores[overflow] = 0.0
    keep = torch.tensor([top_p[b] for b in sampled], dtype=logits.dtype, device=logits.device)[:, None]
    if bool((keep < 1).any()):
        sorted_scores, order = scores.sort(dim=-1)  # ascending
        remove = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= 1 - keep
        remove[:, -1] = False  # the most likely token always stays
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(remove, float("-inf")))
    vocab = logits.shape[-1]
    uniform = torch.stack(
        [torch.rand(vocab, generator=generators[b], device=logits.device, dtype=logits.dtype) for b in sampled]
    )  # (S, V) in [0, 1)
    # argmax(scores + Gumbel noise) is distributed as softmax(scores); a -inf score (filtered
    # out by top_p, or masked by the model) is never drawn.
    drawn = (scores - torch.log(-torch.log(uniform))).argmax(dim=-1)  # (S,)
    tokens[index] = torch.where(overflow, tokens[index], drawn)
    return tokens.tolist()


class Submission:
    """One request on its way through the batcher: its choices' pieces and results, in the
    event loop that submitted it.

    Iterate :meth:`events` (pieces and finished choices, in order) or await :meth:`choices`;
    :meth:`cancel` (idempotent) drops the request's rows that have not finished.
    """

    def __init__(self, n: int, loop: asyncio.AbstractEventLoop, on_cancel: Callable[[Submission], None]) -> None:
        self.n = n
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self._on_cancel = on_cancel
        self.cancelled = threading.Event()

    def _put(self, event: Piece | Choice | EngineError) -> None:  # called from the worker thread
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled.set()

    async def events(self) -> AsyncIterator[Piece | Choice]:
        left = self.n
        while left:
            event = await self._events.get()
            if isinstance(event, EngineError):
                raise event
            if isinstance(event, Choice):
                left -= 1
            yield event

    async def choices(self) -> list[Choice]:
        done = [event async for event in self.events() if isinstance(event, Choice)]
        return sorted(done, key=lambda c: c.index)

    def cancel(self) -> None:
        if not self.cancelled.is_set():
            self.cancelled.set()
            self._on_cancel(self)


class _Row:
    """One choice being generated: its tokens so far and the text already sent."""

    def __init__(
        self,
        sub: Submission,
        index: int,
        prompt_ids: list[int],
        sampling: Sampling,
        stop_ids: list[int],
        stop_strings: list[str],
        device: Any,
        adapter: str | None = None,
    ) -> None:
        import torch

        self.sub, self.index, self.prompt_ids, self.sampling = sub, index, prompt_ids, sampling
        self.adapter = adapter  # a LoRA adapter's name, None for the base
        self.stop_ids, self.stop_strings = set(stop_ids), stop_strings
        self._stop_id_list = stop_ids
        self.generator = None
        if sampling.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(choice_seed(sampling.seed, index))
        self.ids: list[int] = []  # generated, the stop token included when there is one
        self.count = 0  # generated tokens that are not a stop token
        self.sent = ""  # text already sent as pieces

    def push(self, token: int, tokenizer: Any) -> bool:
        """Take the next token, send the text that is now certain; True when the row is done."""
        self.ids.append(token)
        if token in self.stop_ids:
            return self._finish("stop", tokenizer)
        self.count += 1
        text = tokenizer.decode(self.ids, skip_special_tokens=True)
        if any(s in text for s in self.stop_strings):
            return self._finish("stop", tokenizer)
        if self.count >= self.sampling.max_new_tokens:
            return self._finish("length", tokenizer)
        unsure = max(held_back(text, self.stop_strings), len(text) - len(text.rstrip("\ufffd")))
        self._send(text[: len(text) - unsure])
        return False

    def _send(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.sub._put(Piece(self.index, text[len(self.sent) :]))
            self.sent = text

    def _finish(self, reason: str, tokenizer: Any) -> bool:
        text = decode_response(tokenizer, self.ids, self._stop_id_list, self.stop_strings)
        self._send(text)
        self.sub._put(Choice(self.index, text, reason, self.count, tuple(self.ids)))
        return True


class UnknownAdapter(KeyError):
    """A request or an unload names an adapter that is not served (not loaded, or being unloaded)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class LoraAdapters:
    """Named LoRA adapters over one base model, each applied to its own rows of a batch.

    The first adapter wraps the base in a ``PeftModel`` (which puts LoRA layers into it in
    place); later ones are added to it. A forward runs the transformers model inside peft's own
    ``_enable_peft_forward_hooks(adapter_names=...)``, what ``PeftModel.forward`` does with
    ``adapter_names``: every LoRA layer computes ``base(x)`` for the whole batch and adds
    ``B_a(A_a(x[rows of a])) * scaling_a`` on the rows of each adapter ``a`` (peft 0.21's
    ``lora.Linear._mixed_batch_forward``), so a row gets what its adapter alone gives it. Going
    round ``PeftModel.forward`` keeps working when every adapter has been deleted (it would look
    for an active adapter's config). Inside peft each adapter has a name of ours (``served1``,
    ``served2``, ...): a served name may hold what peft's names may not (a ``.`` would break its
    module dicts; a part of ``lora_`` its state-dict keys). Not thread-safe: the :class:`Batcher`
    calls it under its model lock.
    """

    BASE = "__base__"  # peft's name for "no adapter" in adapter_names

    def __init__(self, base: Any) -> None:
        self.base = base
        self.peft: Any = None
        self.folders: dict[str, str] = {}  # served name -> folder
        self._in_peft: dict[str, str] = {}  # served name -> peft's adapter name
        self._loaded = 0

    def load(self, name: str, folder: str) -> None:
        from peft import PeftModel

        self._loaded += 1
        inner = f"served{self._loaded}"
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.base, folder, adapter_name=inner, is_trainable=False)
        else:
            self.peft.load_adapter(folder, adapter_name=inner, is_trainable=False)
        self.peft.eval()
        self.folders[name], self._in_peft[name] = folder, inner

    def unload(self, name: str) -> None:
        self.peft.delete_adapter(self._in_peft.pop(name))
        del self.folders[name]

    def forward(self, adapters: Sequence[str | None], **inputs: Any) -> Any:
        """The model's output for ``inputs``; row b runs with ``adapters[b]`` (None: the base)."""
        if self.peft is None:
            return self.base(**inputs)
        lora = self.peft.base_model
        names = [self._in_peft[a] if a is not None else self.BASE for a in adapters]
        with lora._enable_peft_forward_hooks(adapter_names=names):
            return lora.model(**inputs)


class VirtualTokens:
    """A peft prompt-learning adapter put in front of each row of the batch, as peft 0.21's
    ``PeftModelForCausalLM.generate`` puts it in front of a prompt alone.

    For one unpadded prompt of T tokens and V virtual tokens, peft's generate calls the base model
    with (what its ``forward`` and ``prepare_inputs_for_generation`` do):

    * prompt tuning, p-tuning: ``inputs_embeds`` = ``get_prompt(1)`` (V, the trained embeddings;
      for p-tuning its prompt encoder's output) then the prompt's embeddings; no position ids
      (dropped with a warning), so the model counts 0..V+T-1; every later token attends to the V
      virtual tokens and sits at V+T, V+T+1, ...
    * prefix tuning: the prompt's ids over a cache that ``get_prompt`` fills with V keys and values
      per layer, position ids offset by V (V..V+T-1), and the same V+T, V+T+1, ... afterwards.

    Here a row's mask counts its V virtual columns, so the batcher's positions (the mask's cumsum
    in the prefill, its sum in a decode step) are peft's. Prompt tuning's virtual embeddings go
    after the row's left padding (peft's own batched generate puts them before it, so a padded
    row would see them further away than its prompt alone does); prefix tuning's columns open
    each row's cache, padding after them, which the mask hides.
    """

    SERVED = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")

    def __init__(self, model: Any) -> None:
        config = model.active_peft_config
        self.model = model
        self.kind = str(getattr(config.peft_type, "value", config.peft_type))
        self.count = int(config.num_virtual_tokens)
        self.in_cache = self.kind == "PREFIX_TUNING"

    @classmethod
    def of(cls, model: Any) -> VirtualTokens | None:
        """The virtual tokens of ``model``, None when it has none; an :class:`InputError` for a
        prompt-learning adapter the batch cannot run exactly."""
        config = getattr(model, "active_peft_config", None)
        if not getattr(config, "is_prompt_learning", False):
            return None
        kind = str(getattr(config.peft_type, "value", config.peft_type))
        if kind not in cls.SERVED:
            raise InputError(
                f"the serving engine cannot serve a peft {kind} adapter: of peft's prompt-learning "
                "methods it serves prompt tuning, p-tuning and prefix tuning, whose placement it matches "
                "to peft's generate (the others add task ids or their own cache handling)",
                field="model",
            )
        if type(model).__name__ != "PeftModelForCausalLM":
            raise InputError(
                f"the serving engine serves prompt-learning adapters of causal LMs (task_type CAUSAL_LM); "
                f"this one is a {type(model).__name__} (task_type {config.task_type})",
                field="model",
            )
        tokens = cls(model)
        if tokens.in_cache:
            tokens._check_prefix_cache()
        return tokens

    def _check_prefix_cache(self) -> None:
        import torch

        with torch.inference_mode():
            cache = self.model.get_prompt(batch_size=1)
        layers = [type(layer).__name__ for layer in getattr(cache, "layers", [None])]
        if type(cache).__name__ != "DynamicCache" or set(layers) != {"DynamicLayer"}:
            raise InputError(
                f"prefix tuning on {type(self.model.get_base_model()).__name__}: peft builds its prefix as "
                f"a {type(cache).__name__} ({', '.join(sorted(set(layers)))}), and the batch merges rows only "
                "in a DynamicCache of plain layers (no sliding window)",
                field="model",
            )

    def prefill(self, prompts: list[list[int]], pad_id: int, device: Any) -> tuple[dict[str, Any], Any, Any]:
        """The base model's prefill inputs for ``prompts``, their (P, V + T) mask and cache."""
        import torch
        from transformers import DynamicCache

        v = self.count
        if self.in_cache:
            input_ids, prompt_mask = left_pad(prompts, pad_id, device)  # (P, T)
            cache = self.model.get_prompt(batch_size=len(prompts))  # V columns per row and layer
            mask = torch.cat([prompt_mask.new_ones((len(prompts), v)), prompt_mask], dim=1)  # (P, V + T)
            position_ids = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0) + v  # peft's offset past the prefix
            return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}, mask, cache
        # Placeholder ids in the virtual slots, so that left_pad's mask counts them.
        input_ids, mask = left_pad([[pad_id] * v + p for p in prompts], pad_id, device)  # (P, V + T)
        embeds = self.model.get_base_model().get_input_embeddings()(input_ids)  # (P, V + T, H)
        virtual = self.model.get_prompt(batch_size=1)[0].to(embeds.dtype)  # (V, H), the same for every row
        for b, p in enumerate(prompts):
            start = input_ids.shape[1] - len(p) - v  # right after the row's padding
            embeds[b, start : start + v] = virtual
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
        return {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": position_ids}, mask, DynamicCache()


class Batcher:
    """Generates the rows of all submitted requests together, up to ``max_batch`` rows at a time.

    ``max_queue`` requests may wait while the batch is full; one more gets :class:`QueueFull`.
    The worker thread starts with the first request; :meth:`close` stops it. ``step_sizes``
    counts decode steps by how many rows they ran (what tests and ``/health`` read).

    A peft prompt-learning model runs through its base model with its :class:`VirtualTokens`
    placed in front of each row; an adapter whose placement is not peft's is refused here.

    Over a plain model, up to ``max_loras`` named LoRA adapters may be loaded (:meth:`load`,
    :meth:`unload`); a request's rows run with the adapter it names (:class:`LoraAdapters`).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_queue: int = 16,
        max_loras: int = 0,
    ) -> None:
        if max_batch < 1:
            raise InputError(f"max_batch must be at least 1, got {max_batch}", field="max_batch")
        if max_queue < 0:
            raise InputError(f"max_queue must be at least 0, got {max_queue}", field="max_queue")
        if max_loras < 0:
            raise InputError(f"max_loras must be at least 0, got {max_loras}", field="max_loras")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.max_loras = max_batch, max_queue, max_loras
        self.device = next(model.parameters()).device
        self.virtual = VirtualTokens.of(model)
        # Named adapters go over a plain model only: a peft model served as the base already
        # runs its own adapter in every layer (merge it first, as `instructkit serve` does).
        is_peft = hasattr(model, "peft_config")
        self.adapters = LoraAdapters(model) if max_loras > 0 and not is_peft else None
        self._adapter_state: dict[str, str] = {}  # name -> "loading" | "ready" | "draining"
        self._model_lock = threading.Lock()  # held by a step, a load and an unload
        self._admitted: list[_Row] = []  # rows taken from the queue by the step now running
        # peft's forward would prepend the virtual tokens (or a fresh prefix) at every decode step.
        self._net = model.get_base_model() if self.virtual else model
        self._forward_args = set(inspect.signature(self._net.forward).parameters)
        self._pending: collections.deque[_Row] = collections.deque()  # rows not yet in the batch
        self._waiting: collections.Counter = collections.Counter()  # pending rows per submission
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._paused = False
        self.step_sizes: collections.Counter = collections.Counter()
        # The running batch: rows, their (B, W) attention mask, KV cache and next-token logits (B, V).
        self._rows: list[_Row] = []
        self._mask = self._cache = self._logits = None

    # -- the event loop's side ---------------------------------------------------------------

    @property
    def running(self) -> int:
        """Rows generating now."""
        return len(self._rows)

    @property
    def virtual_tokens(self) -> int:
        """Positions each row's virtual tokens take before its prompt (0 without prompt learning)."""
        return self.virtual.count if self.virtual else 0

    @property
    def waiting(self) -> int:
        """Requests with rows that have not started."""
        return len(self._waiting)

    @property
    def served_adapters(self) -> dict[str, str]:
        """The adapters requests may name now, and their folders (not those loading or unloading)."""
        with self._wake:  # a ready adapter's folder is set before it is ready and kept until it has drained
            return {name: self.adapters.folders[name] for name, s in self._adapter_state.items() if s == "ready"}

    def submit(self, prompt_ids: list[int], sampling: Sampling, n: int = 1, adapter: str | None = None) -> Submission:
        """Queue ``n`` choices of one prompt, to run with the LoRA ``adapter`` (None: the base);
        raises :class:`QueueFull` when there is no room, :class:`UnknownAdapter` when the adapter
        is not served."""
        stop_ids, stop_strings = self.stops(sampling.stop)
        sub = Submission(n, asyncio.get_running_loop(), self._forget)
        rows = [
            _Row(sub, i, list(prompt_ids), sampling, stop_ids, stop_strings, self.device, adapter) for i in range(n)
        ]
        with self._wake:
            if adapter is not None and self._adapter_state.get(adapter) != "ready":
                raise UnknownAdapter(adapter)
            if self._closed:
                raise QueueFull("the server is shutting down")
            free, queued = self._room()
            if n > free and queued >= self.max_queue:
                raise QueueFull(
                    f"the server is busy: {queued} requests already wait for a full batch "
                    f"(max_queue={self.max_queue}, max_batch={self.max_batch})"
                )
            self._pending.extend(rows)
            self._waiting[sub] += n
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="instructkit-batcher", daemon=True)
                self._thread.start()
            self._wake.notify_all()
        return sub

    def encode(self, messages: Sequence[Any]) -> list[int]:
        """The prompt ids of a request's messages (the chat template and the generation prompt)."""
        return encode_prompt(self.tokenizer, list(messages))

    def stops(self, stop: Sequence[str]) -> tuple[list[int], list[str]]:
        """The token ids and strings that end a row (as :func:`instructkit.generation.generate`'s)."""
        return stop_tokens(self.model, self.tokenizer, list(stop), None)

    def load(self, name: str, folder: str) -> None:
        """Load the LoRA adapter in ``folder`` (checked to sit on this base) as ``name``, between
        two steps; an :class:`InputError` when adapters cannot be served here, the name is taken,
        or ``max_loras`` are already loaded. Blocks: call it from a worker thread."""
        with self._wake:
            if self.adapters is None:
                why = (
                    "the server was started with max_loras 0"
                    if self.max_loras == 0
                    else "the served model is itself a peft model (serve its merged weights, or start "
                    "`instructkit serve` with --adapter, which merges it)"
                )
                raise InputError(f"this server does not load LoRA adapters: {why}", field="lora_name")
            if name in self._adapter_state:
                raise InputError(
                    f"an adapter named '{name}' is already {self._adapter_state[name]}; unload it first",
                    field="lora_name",
                )
            if len(self._adapter_state) >= self.max_loras:
                raise InputError(
                    f"{len(self._adapter_state)} adapters are loaded ({', '.join(self._adapter_state)}) and this "
                    f"server holds at most max_loras={self.max_loras}; unload one first",
                    field="lora_name",
                )
            self._adapter_state[name] = "loading"
        try:
            with self._model_lock:
                self.adapters.load(name, folder)
        except BaseException:
            with self._wake:
                del self._adapter_state[name]
            raise
        with self._wake:
            self._adapter_state[name] = "ready"

    def unload(self, name: str) -> None:
        """Stop serving the adapter ``name`` at once (new requests get :class:`UnknownAdapter`),
        wait for its queued and running rows to finish, then remove it from the model.
        Blocks: call it from a worker thread."""
        with self._wake:
            if self._adapter_state.get(name) != "ready":
                raise UnknownAdapter(name)
            self._adapter_state[name] = "draining"
            while any(row.adapter == name for row in [*self._rows, *self._admitted, *self._pending]):
                self._wake.wait()  # the worker notifies after every step
        with self._model_lock:
            self.adapters.unload(name)
        with self._wake:
            del self._adapter_state[name]

    def _forget(self, sub: Submission) -> None:
        """Drop the rows of a cancelled request that have not started (running ones leave the
        batch at the next step), so it no longer holds a place in the queue."""
        with self._wake:
            if self._waiting.pop(sub, None) is not None:
                self._pending = collections.deque(row for row in self._pending if row.sub is not sub)

    def _room(self) -> tuple[int, int]:
        """Batch slots that no pending row will take, and pending requests that do not fit the
        batch (those are the queue ``max_queue`` bounds); under ``_wake``."""
        free, queued = self.max_batch - len(self._rows), 0
        for rows in self._waiting.values():  # in arrival order
            if rows <= free:
                free -= rows
            else:
                free, queued = 0, queued + 1
        return free, queued

    def pause(self) -> None:
        """Stop scheduling (requests are still accepted and queued) until :meth:`resume`."""
        with self._wake:
            self._paused = True

    def resume(self) -> None:
        with self._wake:
            self._paused = False
            self._wake.notify_all()

    def close(self) -> None:
        """Stop the worker after its current step; requests not finished get an :class:`EngineError`.
        A later :meth:`submit` starts a new worker (an app's lifespan may run more than once)."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        with self._wake:
            for sub in {row.sub for row in [*self._rows, *self._pending]}:
                sub._put(EngineError("the server shut down before this request finished"))
            self._rows, self._pending, self._waiting = [], collections.deque(), collections.Counter()
            self._mask = self._cache = self._logits = None
            self._thread, self._closed, self._admitted = None, False, []
            self._wake.notify_all()  # an unload waiting for rows: there are none now

    # -- the worker's side -------------------------------------------------------------------

    def _work(self) -> None:
        import torch

        while True:
            with self._wake:
                self._admitted = []
                self._wake.notify_all()  # the step changed the rows: an unload may be waiting for that
                while not self._closed and (self._paused or not (self._rows or self._pending)):
                    self._wake.wait()
                if self._closed:
                    return
                new = self._admitted = self._admit()
            try:
                with self._model_lock, torch.inference_mode():
                    self._step(new)
            except Exception as exc:  # answered to every request in the batch; the server keeps serving
                error = EngineError(f"generation failed: {type(exc).__name__}: {exc}")
                for sub in {row.sub for row in [*self._rows, *new]}:
                    sub._put(error)
                self._rows, self._mask, self._cache, self._logits = [], None, None, None

    def _admit(self) -> list[_Row]:
        """Take pending rows (first come, first served) into the free slots; under ``_wake``."""
        new: list[_Row] = []
        while self._pending and len(self._rows) + len(new) < self.max_batch:
            row = self._pending.popleft()
            self._waiting[row.sub] -= 1
            if self._waiting[row.sub] == 0:
                del self._waiting[row.sub]
            if not row.sub.cancelled.is_set():
                new.append(row)
        return new

    def _step(self, new: list[_Row]) -> None:
        import torch

        # 1. Prefill the rows that arrived and merge them into the running batch.
        if new:
            self._prefill(new)
        if not self._rows:
            return
        # 2. Each row's next token, with its own sampling settings and generator.
        rows = self._rows
        tokens = pick(
            self._logits,
            [r.sampling.temperature for r in rows],
            [r.sampling.top_p for r in rows],
            [r.generator for r in rows],
        )
        self.step_sizes[len(self._rows)] += 1
        # 3. Send the new text; keep the rows that go on.
        keep = [
            b
            for b, (row, token) in enumerate(zip(self._rows, tokens))
            if not row.sub.cancelled.is_set() and not row.push(token, self.tokenizer)
        ]
        if not keep:
            self._rows, self._mask, self._cache, self._logits = [], None, None, None
            return
        if len(keep) < len(self._rows):
            index = torch.tensor(keep, device=self.device)
            self._rows = [self._rows[b] for b in keep]
            self._mask = self._mask[index]
            self._cache.batch_select_indices(index)
            self._trim()
        # 4. One decode step for every row left.
        next_ids = torch.tensor([tokens[b] for b in keep], device=self.device)[:, None]  # (B, 1)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(keep), 1))], dim=1)  # (B, W + 1)
        position_ids = self._mask.sum(dim=1, keepdim=True) - 1  # (B, 1): each row's own position
        self._logits = self._forward(
            self._cache,
            [row.adapter for row in self._rows],
            input_ids=next_ids,
            attention_mask=self._mask,
            position_ids=position_ids,
        )

    def _forward(self, cache: Any, adapters: list[str | None], **inputs: Any) -> Any:
        """Next-token logits (B, V) after ``inputs`` (ids or embeddings, mask, positions), growing
        ``cache``; row b runs with the LoRA ``adapters[b]`` (None: the base)."""
        extra = {"logits_to_keep": 1} if "logits_to_keep" in self._forward_args else {}
        inputs = {**inputs, "past_key_values": cache, "use_cache": True, **extra}
        out = self.adapters.forward(adapters, **inputs) if self.adapters else self._net(**inputs)
        return out.logits[:, -1, :].float()  # (B, V)

    def _prefill_inputs(self, prompts: list[list[int]]) -> tuple[dict[str, Any], Any, Any]:
        """The prefill's model inputs for ``prompts``, left-padded, with their mask and cache."""
        from transformers import DynamicCache

        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if self.virtual:
            return self.virtual.prefill(prompts, pad_id, self.device)
        input_ids, mask = left_pad(prompts, pad_id, self.device)  # (P, T), 0 on the left padding
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)  # as generate() derives them
        return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}, mask, DynamicCache()

    def _prefill(self, new: list[_Row]) -> None:
        import torch

        if self.model.training:
            self.model.eval()
        # The choices of one request share a prompt: prefill it once, then repeat its rows.
        first: dict[int, int] = {}
        prompts: list[list[int]] = []
        adapters: list[str | None] = []
        for row in new:
            if id(row.sub) not in first:
                first[id(row.sub)] = len(prompts)
                prompts.append(row.prompt_ids)
                adapters.append(row.adapter)
        inputs, mask, cache = self._prefill_inputs(prompts)
        logits = self._forward(cache, adapters, **inputs)  # (P, V)
        if len(prompts) < len(new):
            index = torch.tensor([first[id(row.sub)] for row in new], device=self.device)
            logits, mask = logits[index], mask[index]
            cache.batch_select_indices(index)
        if not self._rows:
            self._rows, self._mask, self._cache, self._logits = list(new), mask, cache, logits
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for old, add in zip(self._cache.layers, cache.layers):
            if type(old).__name__ != "DynamicLayer" or type(add).__name__ != "DynamicLayer":
                raise EngineError(f"cannot batch with a {type(old).__name__} cache layer")
            old.keys = torch.cat([_pad_left(old.keys, width, -2), _pad_left(add.keys, width, -2)])
            old.values = torch.cat([_pad_left(old.values, width, -2), _pad_left(add.values, width, -2)])
        self._mask = torch.cat([_pad_left(self._mask, width, 1), _pad_left(mask, width, 1)])
        self._logits = torch.cat([self._logits, logits])
        self._rows.extend(new)

    def _trim(self) -> None:
        """Drop cache columns on the left that no remaining row attends to."""
        used = self._mask.any(dim=0)
        start = int(used.int().argmax())  # the first column some row uses
        if start == 0:
            return
        self._mask = self._mask[:, start:]
        for layer in self._cache.layers:
            layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]


class Seq2SeqBatcher(Batcher):
    """The batcher for an encoder-decoder (BART, T5, BERT2BERT): the simplest correct path, not
    continuous batching. Each step takes the waiting rows (up to ``max_batch``) and runs them to
    the end through :func:`instructkit.generation.generate_seq2seq_ids`: the greedy rows of one
    decoding setting as one batch, each sampled row alone with its choice's seed. Its tokens then
    go through the row as the decoder path's do (same stops, pieces and final text), so a greedy
    request gets the text ``instructkit generate`` gives. The prompt is the messages' source text
    (no chat template); named LoRA adapters are not served.
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_batch: int = DEFAULT_MAX_BATCH, max_queue: int = 16) -> None:
        super().__init__(model, tokenizer, max_batch=max_batch, max_queue=max_queue, max_loras=0)

    def encode(self, messages: Sequence[Any]) -> list[int]:
        from instructkit.data.seq2seq import encode_source

        return encode_source(self.tokenizer, list(messages))

    def stops(self, stop: Sequence[str]) -> tuple[list[int], list[str]]:
        from instructkit.generation import seq2seq_stop_tokens

        return seq2seq_stop_tokens(self.model, self.tokenizer, list(stop))

    def load(self, name: str, folder: str) -> None:
        raise InputError(
            "this server does not load LoRA adapters: the served model is an encoder-decoder", field="lora_name"
        )

    def _step(self, new: list[_Row]) -> None:
        from instructkit.generation import generate_seq2seq_ids

        groups: dict[tuple, list[_Row]] = {}
        for row in new:  # greedy rows of one setting batch together; a sampled row runs alone with its seed
            s = row.sampling
            key = (s.max_new_tokens, s.stop) if s.temperature == 0 else (id(row),)
            groups.setdefault(key, []).append(row)
        for rows in groups.values():
            s = rows[0].sampling
            seed = choice_seed(s.seed, rows[0].index) if s.temperature > 0 else 0
            generated = generate_seq2seq_ids(
                self.model,
                self.tokenizer,
                [row.prompt_ids for row in rows],
                max_new_tokens=s.max_new_tokens,
                temperature=s.temperature,
                top_p=s.top_p,
                batch_size=len(rows),
                seed=seed,
                stop=list(s.stop),
            )
            self.step_sizes[len(rows)] += 1
            for row, ids in zip(rows, generated):
                if row.sub.cancelled.is_set():
                    continue
                if not any(row.push(token, self.tokenizer) for token in ids):
                    row._finish("length", self.tokenizer)  # ran out of tokens without a stop


def make_batcher(model: Any, tokenizer: Any, **kwargs: Any) -> Batcher:
    """A :class:`Seq2SeqBatcher` for an encoder-decoder (no LoRA adapters), else a :class:`Batcher`."""
    from instructkit.generation import is_encoder_decoder

    if is_encoder_decoder(model):
        kwargs.pop("max_loras", None)
        return Seq2SeqBatcher(model, tokenizer, **kwargs)
    return Batcher(model, tokenizer, **kwargs)


def _pad_left(x: Any, width: int, dim: int) -> Any:
    """``x`` with zeros prepended along ``dim`` up to ``width``."""
    import torch.nn.functional as F

    missing = width - x.shape[dim]
    if missing == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - (dim % x.dim())) + [missing, 0]
    return F.pad(x, pad)
