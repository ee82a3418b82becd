"""Config load refuses engine/train settings that vLLM or peft would only refuse after a whole round."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from helpers import tiny_config
from loop.config import ConfigError, check_model, load_config
from loop.models.resolve import resolve_model


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


def test_evaluation_schedule_and_primary_comparison(tmp_path):
    eval_ = {"tasks": {"family": "arithmetic", "split": "eval", "limit": 4, "difficulty": 1},
             "sampling": {"n": 2, "temperature": 1.0, "max_tokens": 48, "seed": 1}}
    cfg = load_config(tiny_config(tmp_path, rounds=5, eval={**eval_, "every": 2}))
    assert [r for r in range(6) if cfg.eval.evaluates(r, cfg.rounds)] == [0, 2, 4, 5]
    cfg = load_config(tiny_config(tmp_path, rounds=5, eval={**eval_, "every": "last"}))
    assert [r for r in range(6) if cfg.eval.evaluates(r, cfg.rounds)] == [0, 5]
    assert cfg.eval.common_seeds and cfg.eval.primary == "pass@1"
    assert "eval.primary: pass@4 needs k <= eval.sampling.n (2)" in refused(tmp_path, eval={**eval_, "primary": "pass@4"})
    assert "not an accuracy" in refused(tmp_path, eval={**eval_, "primary": "accuracy"})
    assert "greedy_acc needs eval.greedy" in refused(tmp_path, eval={**eval_, "primary": "greedy_acc", "greedy": False})
    assert "eval.every" in refused(tmp_path, eval={**eval_, "every": 0})


def test_fresh_training_tasks_exclude_rehearsal_and_stay_off_the_eval_set(tmp_path):
    train = {"family": "arithmetic", "split": "train", "limit": 6, "difficulty": 1, "fresh_per_round": True}
    assert load_config(tiny_config(tmp_path, train_tasks=train)).train_tasks.fresh_per_round
    assert "use one of the two" in refused(tmp_path, train_tasks=train, pairs={"rehearsal": 0.5})
    msg = refused(tmp_path, eval={"tasks": {"family": "arithmetic", "split": "eval", "fresh_per_round": True}})
    assert "eval.tasks" in msg and "must stay the same in every round" in msg


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path):
    assert load_config(path).name == path.stem
