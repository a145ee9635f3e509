"""Reward functions named in configs: the protocol they follow and how a name is resolved.

A reward function scores one response: ``reward(prompt, response, **data) -> float``, where
``data`` holds the other fields of the prompt's record (the arguments of a verifier, a reference
answer, ...). Configs name one as ``"module:function"``, e.g.
``"instructkit.verifiers:ifeval_reward"``; :func:`load_reward_function` turns that into the
callable, or an :class:`~instructkit.errors.InputError` that says what is wrong with the name.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Protocol

from instructkit.errors import InputError, did_you_mean

EXAMPLE_SPEC = "instructkit.verifiers:ifeval_reward"


class RewardFunction(Protocol):
    """``(prompt, response, **data) -> float``: higher is better."""

    def __call__(self, prompt: str, response: str, **data: Any) -> float: ...


def load_reward_function(spec: str) -> RewardFunction:
    """Import the callable that ``spec`` (``"package.module:function"``) names.

    The part after the colon may be dotted (``"module:Class.method"``). Raises
    :class:`InputError` naming ``spec`` when it is malformed, when the module or the attribute
    does not exist (suggesting the closest name there is), or when it names something that
    cannot be called.
    """
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name.strip() or not attribute.strip():
        raise InputError(f"reward function '{spec}': expected 'module:function', e.g. '{EXAMPLE_SPEC}'")
    module = _import_module(spec, module_name.strip())
    target: Any = module
    where = module_name.strip()
    for name in attribute.strip().split("."):
        if not hasattr(target, name):
            public = [a for a in dir(target) if not a.startswith("_")]
            raise InputError(
                f"reward function '{spec}': '{where}' has no attribute '{name}'{did_you_mean(name, public)}"
            )
        target = getattr(target, name)
        where = f"{where}.{name}"
    if not callable(target):
        raise InputError(f"reward function '{spec}': '{attribute}' is a {type(target).__name__}, not a function")
    return target


def _import_module(spec: str, module_name: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = err.name or module_name
        if not (module_name == missing or module_name.startswith(missing + ".")):
            # The module exists but one of its own imports is missing: that is not a bad name.
            raise
    parent, _, leaf = missing.rpartition(".")
    siblings: list[str] = []
    if parent:
        try:
            package = importlib.import_module(parent)
            siblings = [m.name for m in pkgutil.iter_modules(getattr(package, "__path__", []))]
        except ImportError:
            pass
    raise InputError(f"reward function '{spec}': no module named '{missing}'{did_you_mean(leaf, siblings)}")


def exact_match(prompt: str, response: str, *, answer: str, **data: Any) -> float:
    """1.0 when the response equals the record's reference ``answer`` (surrounding whitespace
    and case ignored), else 0.0: a verifiable reward for tasks with one right answer."""
    return float(response.strip().casefold() == str(answer).strip().casefold())
