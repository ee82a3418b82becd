"""Config load refuses engine/train settings that vLLM or peft would only refuse after a whole round."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from helpers import tiny_config
from loop.config import ConfigError, check_model, load_config
from loop.models import resolve_model


def refused(tmp_path: Path, **over) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(tiny_config(tmp_path, **over))
    return str(e.value)


def test_lora_rank_above_what_the_engine_serves_is_refused(tmp_path):
    msg = refused(tmp_path, engine={"max_lora_rank": 16}, train={"lora_r": 32})
    assert "engine.max_lora_rank (16) is below train.lora_r (32)" in msg and "engine.max_lora_rank: 32" in msg
    msg = refused(tmp_path, engine={"max_lora_rank": 12})
    assert "not a rank vLLM accepts" in msg and "engine.max_lora_rank: 16" in msg
    assert load_config(tiny_config(tmp_path, engine={"max_lora_rank": 32}, train={"lora_r": 32})).train.lora_r == 32


def test_lora_on_embeddings_or_no_module_is_refused(tmp_path):
    assert "lm_head" in refused(tmp_path, train={"target_modules": ["q_proj", "lm_head"]})
    assert "is empty" in refused(tmp_path, train={"target_modules": []})


def test_target_modules_the_model_lacks_are_refused_before_the_engine_starts(tmp_path):
    path = resolve_model("smollm2-135m-instruct").path
    cfg = load_config(tiny_config(tmp_path, train={"target_modules": ["q_proj", "q_prj", "norm"]}))
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"\['q_prj', 'norm'\].*its linear layers: .*down_proj.*q_proj"):
        check_model(cfg, path)
    assert time.perf_counter() - t0 < 2  # safetensors headers only, no weights
    check_model(load_config(tiny_config(tmp_path, train={"target_modules": ["q_proj", "v_proj"]})), path)
    check_model(load_config(tiny_config(tmp_path)), path)  # all-linear


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path):
    assert load_config(path).name == path.stem
