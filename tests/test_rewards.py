"""instructkit.rewards.load_reward_function: resolving "module:function", and every bad name."""

from __future__ import annotations

import pytest

from instructkit.errors import InputError
from instructkit.rewards import load_reward_function
from instructkit.verifiers import ifeval_reward


def test_loads_the_named_function():
    assert load_reward_function("instructkit.verifiers:ifeval_reward") is ifeval_reward
    assert load_reward_function(" instructkit.verifiers : ifeval_reward ") is ifeval_reward


def test_dotted_attribute():
    """The part after the colon may walk attributes: a method of a module-level object."""
    fn = load_reward_function("instructkit.verifiers.ifeval:INSTRUCTIONS.get")
    assert fn("punctuation:no_comma")("no commas")


@pytest.mark.parametrize("spec", ["ifeval_reward", "instructkit.verifiers:", ":ifeval_reward", ""])
def test_malformed_spec(spec):
    with pytest.raises(InputError, match=r"expected 'module:function', e.g. 'instructkit.verifiers:ifeval_reward'"):
        load_reward_function(spec)


def test_missing_module_suggests_a_sibling():
    with pytest.raises(InputError) as info:
        load_reward_function("instructkit.verifier:ifeval_reward")
    assert str(info.value) == (
        "reward function 'instructkit.verifier:ifeval_reward': no module named 'instructkit.verifier'"
        " (did you mean 'verifiers'?)"
    )


def test_missing_top_level_module():
    with pytest.raises(InputError, match=r"no module named 'no_such_package_xyz'$"):
        load_reward_function("no_such_package_xyz.rewards:score")


def test_missing_attribute_suggests_the_closest():
    with pytest.raises(InputError) as info:
        load_reward_function("instructkit.verifiers:ifeval_rewrd")
    assert str(info.value) == (
        "reward function 'instructkit.verifiers:ifeval_rewrd': 'instructkit.verifiers' has no attribute"
        " 'ifeval_rewrd' (did you mean 'ifeval_reward'?)"
    )


def test_not_callable():
    with pytest.raises(InputError, match=r"'INSTRUCTIONS' is a dict, not a function"):
        load_reward_function("instructkit.verifiers:INSTRUCTIONS")


def test_a_broken_import_inside_the_module_is_not_reported_as_a_bad_name(tmp_path, monkeypatch):
    """The module exists but imports something missing: the real ModuleNotFoundError surfaces."""
    (tmp_path / "broken_reward_mod.py").write_text("import no_such_dependency_xyz\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        load_reward_function("broken_reward_mod:score")
