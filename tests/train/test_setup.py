"""The shared recipe set-up: data read through a LLaMA-Factory dataset_info.json from a stage
config, and the up-front data check a recipe runs for every stage."""

from __future__ import annotations

import json

import pytest

from instructkit.config import DataConfig, SFTConfig, load_config
from instructkit.data.check import check_data_file
from instructkit.data.schema import Conversation
from instructkit.errors import InputError
from instructkit.train.setup import load_splits


def test_data_dataset_info_in_a_stage_config_reads_the_named_dataset(llama_factory_data):
    """`data.dataset_info` + `data.path` naming an entry: the entry's file, format and columns apply,
    exactly as LLaMA-Factory reads it (alpaca_en_demo: instruction/input/output records)."""
    info = llama_factory_data / "dataset_info.json"
    cfg = load_config(
        SFTConfig, None, [f"data.dataset_info={info}", "data.path=alpaca_en_demo", "data.val_fraction=0.25"]
    )
    splits = load_splits(cfg.data)
    rows = json.loads((llama_factory_data / "alpaca_en_demo.json").read_text())
    assert len(splits.train) + len(splits.val) == len(rows)
    assert all(isinstance(r, Conversation) for r in splits.train + splits.val)
    outputs = {r["output"] for r in rows}
    assert all(r.messages[-1].content in outputs for r in splits.train)


def test_an_unknown_dataset_name_is_located(llama_factory_data):
    info = llama_factory_data / "dataset_info.json"
    data = DataConfig(path="alpaca_en_dem", dataset_info=str(info))
    with pytest.raises(InputError, match="did you mean 'alpaca_en_demo'"):
        load_splits(data)


def test_the_up_front_check_reads_records_as_their_stage_does(llama_factory_data, tmp_path):
    info = str(llama_factory_data / "dataset_info.json")
    assert check_data_file("dpo_en_demo", "pairs", dataset_info=info) > 0
    with pytest.raises(InputError, match="not Conversation|Conversation records"):
        check_data_file("alpaca_en_demo", "pairs", dataset_info=info)  # demonstrations are not pairs
    with pytest.raises(InputError, match="expected demonstrations"):
        check_data_file("dpo_en_demo", "demonstrations", dataset_info=info)
    with pytest.raises(InputError, match=r"no such file .*did you mean"):
        check_data_file(str(llama_factory_data / "alpaca_en_dem.json"), "demonstrations")
