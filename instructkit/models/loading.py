"""Load a causal LM and its tokenizer from any model spec a user can give.

A spec is one of: the name of an embedded model (``smollm2-135m-instruct``), a GGUF file, a run
folder of ours (its ``final/``), a local Hugging Face folder (full weights, a peft adapter, or
bottleneck adapters, see ``models.bottleneck``), or a Hub id found in the local cache. Weights
load from safetensors only; remote code runs only when asked. A qlora adapter's base is
quantised to 4 bits again before the adapter goes on (``models.qlora``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instructkit.errors import InputError, did_you_mean
from instructkit.models.embedded import EMBEDDED, embedded_model_dir, gguf_model_dir

BOTTLENECK_CONFIG = "bottleneck_config.json"  # models.bottleneck.CONFIG_NAME (that module imports torch)
QUANTIZATION_RECORD = "instructkit_quantization.json"  # models.qlora.RECORD_NAME
# bitsandbytes (imported by peft when installed) warns on every import, on CPUs with AVX512-BF16,
# that an optional Hub kernel is missing; its own CPU kernels run instead.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


@dataclass(frozen=True)
class ResolvedModel:
    """Where a spec points: an HF folder or Hub id, and the peft adapter on top, if any."""

    base: str
    adapter: str | None = None
    local: bool = True
    merged_first: tuple[str, ...] = ()  # earlier adapters (e.g. SFT's under DPO's), merged in order
    bottleneck: str | None = None  # a folder of bottleneck adapters to attach (instead of ``adapter``)
    quantized: bool = False  # the adapter was trained over the 4-bit NF4 base (qlora)

    @property
    def folder(self) -> str | None:
        """The adapter folder of either kind, if any."""
        return self.adapter or self.bottleneck


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str, field: str = "device") -> None:
    """A located InputError when ``device`` names an accelerator this machine does not have."""
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(
                f"device '{device}' asked for, but this machine has no CUDA GPU "
                "(torch.cuda.is_available() is False); use cpu",
                field=field,
            )
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise InputError(
                f"device '{device}' asked for, but there are {torch.cuda.device_count()} GPUs", field=field
            )
    elif device == "mps" and not torch.backends.mps.is_available():
        raise InputError("device 'mps' asked for, but MPS is not available here; use cpu", field=field)


def default_dtype(device: str) -> Any:
    """fp32 on CPU (bf16 matmuls are slow there), bf16 on a GPU that has it, else fp16."""
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def parse_dtype(dtype: Any) -> Any:
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "fp32": "float32",
        "float32": "float32",
        "fp16": "float16",
        "float16": "float16",
        "bf16": "bfloat16",
        "bfloat16": "bfloat16",
    }
    if dtype not in names:
        raise InputError(f"unknown dtype '{dtype}' (expected one of fp32, bf16, fp16)", field="dtype")
    return getattr(torch, names[dtype])


def resolve(spec: str | os.PathLike) -> ResolvedModel:
    """Turn a model spec into an HF folder/id (+ adapter folder). Converts GGUF files once."""
    spec = str(spec)
    if spec in EMBEDDED:
        return ResolvedModel(str(embedded_model_dir(spec)))
    try:
        path = Path(spec).expanduser()
    except RuntimeError as exc:  # "~name" of no such user, or no home directory to put for "~"
        raise InputError(f"cannot expand the '~' of this path ({exc})", file=spec) from None
    if path.is_file() and path.suffix == ".gguf":
        return ResolvedModel(str(gguf_model_dir(path)))
    if path.is_dir():
        if (path / "final").is_dir():  # a run folder of ours
            return resolve(path / "final")
        if (path / "adapter_config.json").is_file():
            base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
            marker = path / "instructkit_base.txt"  # the spec we trained from, more useful than a cache path
            if marker.is_file():
                base = marker.read_text().strip()
            if not base:
                raise InputError("adapter_config.json names no base model", file=str(path))
            under = _base_under(base, path)
            earlier = (*under.merged_first, under.adapter) if under.adapter else under.merged_first
            quantized = (path / QUANTIZATION_RECORD).is_file()
            return ResolvedModel(
                under.base, adapter=str(path), local=under.local, merged_first=earlier, quantized=quantized
            )
        if (path / BOTTLENECK_CONFIG).is_file():
            if (path / "config.json").is_file():  # whole weights with the adapters beside (a reward model)
                return ResolvedModel(str(path), bottleneck=str(path))
            base = _bottleneck_base(path)
            under = _base_under(base, path)
            earlier = (*under.merged_first, under.adapter) if under.adapter else under.merged_first
            return ResolvedModel(under.base, local=under.local, merged_first=earlier, bottleneck=str(path))
        if (path / "config.json").is_file():
            return ResolvedModel(str(path))
        gguf = sorted(path.glob("*.gguf"))
        if len(gguf) == 1:  # an export stage's final/: the one file is the model
            return ResolvedModel(str(gguf_model_dir(gguf[0])))
        raise InputError(
            "folder holds no model (no config.json, adapter_config.json, final/ or one .gguf file)", file=spec
        )
    if path.exists():
        raise InputError("not a model: expected a folder, a .gguf file or a model name", file=spec)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return ResolvedModel(spec, local=False)
    names = ", ".join(EMBEDDED)
    raise InputError(
        f"no such model file or folder, and not a Hub id or embedded model ({names}){did_you_mean(spec, EMBEDDED)}",
        file=spec,
    )


def _bottleneck_base(path: Path) -> str:
    try:
        base = json.loads((path / BOTTLENECK_CONFIG).read_text()).get("base")
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {BOTTLENECK_CONFIG} ({exc})", file=str(path)) from exc
    if not base:
        raise InputError(f"{BOTTLENECK_CONFIG} names no base model", file=str(path))
    return base


def _base_under(base: str, path: Path) -> ResolvedModel:
    """The model an adapter folder sits on; it may itself be an adapter run (DPO over LoRA SFT),
    but not one whose adapters cannot merge (a 4-bit or a bottleneck-adapter stage)."""
    under = resolve(base)
    if under.bottleneck or under.quantized or (under.adapter and prompt_learning_type(under.adapter)):
        kind = (
            "bottleneck adapters"
            if under.bottleneck
            else "a qlora adapter over a 4-bit base"
            if under.quantized
            else f"a {prompt_learning_type(under.adapter)} adapter (virtual tokens)"
        )
        raise InputError(f"the base {base} holds {kind}, which cannot merge under another adapter", file=str(path))
    return under


PROMPT_LEARNING_TYPES = {"PROMPT_TUNING": "prompt_tuning", "PREFIX_TUNING": "prefix_tuning", "P_TUNING": "p_tuning"}


def prompt_learning_type(adapter: str | os.PathLike) -> str | None:
    """The instructkit method name of a peft prompt-learning adapter folder, else None."""
    config = Path(adapter, "adapter_config.json")
    peft_type = json.loads(config.read_text()).get("peft_type") if config.is_file() else None
    return PROMPT_LEARNING_TYPES.get(peft_type)


def _hub_kwargs(resolved: ResolvedModel) -> dict[str, Any]:
    return {} if resolved.local else {"local_files_only": True}


def _offline_error(spec: str, exc: Exception) -> InputError:
    return InputError(
        f"Hub model '{spec}' is not in the local Hugging Face cache and this machine does not "
        f"download models; put it in the cache or pass a local folder ({type(exc).__name__})",
        field="model",
    )


def load_tokenizer(spec: str | os.PathLike, *, trust_remote_code: bool = False):
    """The tokenizer for a model spec, with a pad token set (eos when it has none)."""
    from transformers import AutoTokenizer

    resolved = resolve(spec)
    source = (
        resolved.folder
        if resolved.folder and Path(resolved.folder, "tokenizer_config.json").is_file()
        else resolved.base
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **_hub_kwargs(resolved))
    except OSError as exc:
        if not resolved.local:
            raise _offline_error(resolved.base, exc) from exc
        raise
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    spec: str | os.PathLike,
    *,
    dtype: Any = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    merge_adapter: bool = False,
    attn_implementation: str | None = None,
):
    """Load a causal LM (or an encoder-decoder, when its config says so) from a model spec, on
    ``device`` in ``dtype`` (sensible defaults).

    An adapter folder comes back as a ``PeftModel`` over its base (merged when asked). Bottleneck
    adapters come back attached to their base, unmerged even when a merge is asked (a later stage
    keeps training them); a qlora adapter comes back over its 4-bit base and cannot merge.
    """
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    check_device(device)
    dtype = parse_dtype(dtype) or default_dtype(device)
    resolved = resolve(spec)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        auto = AutoModelForCausalLM
        if _is_seq2seq(resolved, trust_remote_code):  # BART, T5, a BERT2BERT: the same spec rules
            from transformers import AutoModelForSeq2SeqLM as auto
        model = auto.from_pretrained(resolved.base, **kwargs, **_hub_kwargs(resolved))
    except OSError as exc:
        if not resolved.local:
            raise _offline_error(resolved.base, exc) from exc
        raise
    if resolved.quantized and merge_adapter:
        raise InputError(
            "a qlora adapter was trained over the 4-bit base and does not merge into it exactly; a stage "
            "cannot start from it (train the earlier stage with lora, or run this one from the base)",
            file=resolved.adapter,
        )
    if resolved.merged_first:
        from peft import PeftModel

        for earlier in resolved.merged_first:
            model = PeftModel.from_pretrained(model, earlier).merge_and_unload()
    if resolved.quantized:
        from instructkit.models.qlora import check_record, quantize_nf4

        check_record(Path(resolved.adapter))
        quantize_nf4(model)
    if resolved.adapter:
        from peft import PeftModel

        virtual = prompt_learning_type(resolved.adapter)
        if virtual and merge_adapter:
            raise InputError(
                f"a {virtual} adapter (virtual tokens) does not merge into the model, so a stage cannot start "
                "from it; train the earlier stage with lora, or run this one from the base",
                file=resolved.adapter,
            )
        model = PeftModel.from_pretrained(model, resolved.adapter)
        if merge_adapter:
            model = model.merge_and_unload()
    if resolved.bottleneck:
        from instructkit.models import bottleneck

        bottleneck.load(model, Path(resolved.bottleneck))
    return model.to(device)


def model_config(resolved: ResolvedModel, *, trust_remote_code: bool = False) -> dict[str, Any] | None:
    """The base model's config as a dict, read without weights (its ``config.json``, or the
    cached Hub config); None when there is none to read."""
    path = Path(resolved.base) / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    if resolved.local:
        return None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolved.base, trust_remote_code=trust_remote_code, local_files_only=True)
    except OSError:
        return None
    return config.to_dict()


def _is_seq2seq(resolved: ResolvedModel, trust_remote_code: bool) -> bool:
    """Whether the base is an encoder-decoder (BART, T5, a saved EncoderDecoderModel) by its config."""
    found = model_config(resolved, trust_remote_code=trust_remote_code)
    return bool(found and (found.get("is_encoder_decoder") or found.get("model_type") == "encoder-decoder"))


def load_model_and_tokenizer(spec: str | os.PathLike, **kwargs: Any):
    trust = kwargs.get("trust_remote_code", False)
    return load_model(spec, **kwargs), load_tokenizer(spec, trust_remote_code=trust)


def _same_place(spec: str) -> str:
    """A path or Hub id spelled one way, so that two specs of one model compare equal."""
    return os.path.realpath(spec) if os.path.exists(spec) else spec


def mergeable_base(spec: str | os.PathLike, field: str = "model") -> tuple[str, ...]:
    """What the model ``spec`` is, as the chain (base, adapters merged into it in order) that a
    LoRA adapter trained on it records; an InputError when LoRA adapters cannot sit on it (a
    4-bit base, bottleneck adapters, or a prompt-learning adapter, none of which merge)."""
    resolved = resolve(spec)
    if resolved.bottleneck or resolved.quantized or (resolved.adapter and prompt_learning_type(resolved.adapter)):
        kind = (
            "bottleneck adapters"
            if resolved.bottleneck
            else "a qlora adapter over a 4-bit base"
            if resolved.quantized
            else f"a {prompt_learning_type(resolved.adapter)} adapter (virtual tokens)"
        )
        raise InputError(
            f"{spec} holds {kind}, which does not merge, so LoRA adapters cannot be served over it", field=field
        )
    chain = (*resolved.merged_first, resolved.adapter) if resolved.adapter else resolved.merged_first
    return tuple(_same_place(p) for p in (resolved.base, *chain))


def lora_adapter_folder(spec: str | os.PathLike, base: str | os.PathLike) -> str:
    """The folder of the LoRA adapter ``spec`` (a run folder gives its final/), checked to sit on
    the model ``base`` names; from its config files alone, so nothing loads when it is refused.

    An InputError (file = the spec) when it is not a peft adapter, is not LoRA (rslora and other
    plain-LoRA options are; DoRA and aLoRA are not: peft 0.21's mixed-adapter batches refuse DoRA,
    and aLoRA needs per-request offsets), has no safetensors weights, or was trained on another base.
    """
    spec = str(spec)
    try:
        resolved = resolve(spec)
    except InputError:
        raise
    except (OSError, ValueError) as exc:  # e.g. a path with a NUL byte
        raise InputError(f"not a usable path ({exc})", file=spec) from exc
    folder = resolved.adapter
    if folder is None:
        raise InputError(
            "not a peft adapter folder (no adapter_config.json, nor a run folder whose final/ has one)", file=spec
        )
    try:
        config = json.loads(Path(folder, "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read adapter_config.json ({exc})", file=folder) from exc
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise InputError(
            f"a peft {peft_type} adapter: only LoRA adapters (lora, rslora, ...) are served by name over a base",
            file=folder,
        )
    if config.get("use_dora"):
        raise InputError(
            "a DoRA adapter: peft 0.21 does not run DoRA in mixed-adapter batches; merge it "
            "(instructkit export --format merged) and serve the merged model on its own",
            file=folder,
        )
    if config.get("alora_invocation_tokens"):
        raise InputError(
            "an aLoRA adapter (activated by invocation tokens), which the batch does not serve", file=folder
        )
    if resolved.quantized:
        raise InputError(
            "a qlora adapter, trained over the 4-bit base; it is not served over a full-precision base", file=folder
        )
    if not Path(folder, "adapter_model.safetensors").is_file():
        raise InputError("no adapter_model.safetensors (adapters load from safetensors only)", file=folder)
    parent = tuple(_same_place(p) for p in (resolved.base, *resolved.merged_first))
    served = mergeable_base(base)
    if parent != served:
        raise InputError(
            f"this adapter sits on {' + '.join(parent)}, not on the served base {base} ({' + '.join(served)})",
            file=folder,
        )
    return folder
