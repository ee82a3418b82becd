"""A round with grader crashes: each crash is an "error" verdict logged with its sample, and the round stops
only when one is the gold data's fault or their share passes verify.max_error_share. Real graders throughout:
the crash here is run_tests refusing a task whose entry point is not a Python name (a grader-side failure)."""
from __future__ import annotations

import json
import logging
import types

import pytest

from loop.grading import GOLD_ERROR, VerifierCrash, VerifyConfig, grade_trajectories, grading_counts
from loop.records import Segment, Trajectory
from loop.tasks.base import Task

TESTS = "def check(c):\n    assert c(1) == 1\n"


def _trajectory(task_id: str, sample: int, text: str) -> Trajectory:
    return Trajectory(task_id, sample, [1, 2], [Segment("model", text, [3])])


def _round(n_math: int, n_crashes: int, bad_gold: bool = False):
    tasks = {"m": Task("m", "q", "math", "train", answer="7")}
    trajs = [_trajectory("m", s, f"so #### {7 if s % 2 else 8}") for s in range(n_math)]
    tasks["c"] = Task("c", "q", "code", "train", tests=TESTS, entry_point="not a name")
    trajs += [_trajectory("c", s, "```python\ndef f(x):\n    return x\n```") for s in range(n_crashes)]
    if bad_gold:
        tasks["g"] = Task("g", "q", "math", "train", answer=r"\frac{")
        trajs.append(_trajectory("g", 0, r"\boxed{x+1}"))
    return tasks, trajs


def test_a_crash_under_the_threshold_is_logged_and_the_round_completes(caplog):
    tasks, trajs = _round(199, 1)  # 1 crash in 200 samples: 0.5%
    with caplog.at_level(logging.WARNING, logger="loop.grading"):
        graded = grade_trajectories(tasks, trajs, VerifyConfig(workers=1))
    errors = [g for g in graded if g.status == "error"]
    assert len(errors) == 1 and "grader crashed" in errors[0].reason
    assert "task c sample 0" in caplog.text and "def f(x)" in caplog.text  # the crash, with its sample
    assert grading_counts(graded)["verify/errors"] == 1
    assert sum(g.correct for g in graded) == 99


def test_crashes_over_the_threshold_stop_the_round():
    tasks, trajs = _round(98, 2)  # 2%
    with pytest.raises(VerifierCrash, match="over the threshold.*task c sample 0"):
        grade_trajectories(tasks, trajs, VerifyConfig(workers=1))
    # the threshold is the config's
    assert len(grade_trajectories(tasks, trajs, VerifyConfig(workers=1, max_error_share=0.05))) == 100


def test_any_crash_on_gold_data_stops_the_round():
    tasks, trajs = _round(400, 0, bad_gold=True)
    with pytest.raises(VerifierCrash, match="on gold data.*task g sample 0"):
        grade_trajectories(tasks, trajs, VerifyConfig(workers=1, max_error_share=0.5))
    tasks["m"] = Task("m", "q", "math", "train", answer=None)
    with pytest.raises(VerifierCrash, match="on gold data"):
        grade_trajectories(tasks, trajs[:3], VerifyConfig(workers=1))


def test_through_the_flows_verify_task(tmp_path):
    from flows.self_improve import verify

    samples, out = tmp_path / "samples.jsonl", tmp_path / "graded.jsonl"
    for n_math, stops in ((199, False), (49, True)):
        tasks, trajs = _round(n_math, 1)
        samples.write_text("".join(json.dumps(t.to_dict()) + "\n" for t in trajs))
        cfg = types.SimpleNamespace(verify=VerifyConfig(workers=1))  # the task reads cfg.verify only
        if stops:
            with pytest.raises(VerifierCrash):
                verify.fn(tasks, cfg, samples, out, None)
            continue
        metrics = verify.fn(tasks, cfg, samples, out, None)
        assert metrics["verify/errors"] == 1 and metrics["verify/code_timeouts"] == 0
        assert len(out.read_text().splitlines()) == 200


def test_a_code_timeout_is_a_wrong_program_and_counted():
    tasks = {"c": Task("c", "q", "code", "train", tests=TESTS, entry_point="f")}
    loop_forever = [_trajectory("c", 0, "```python\ndef f(x):\n    while True:\n        pass\n```")]
    [g] = grade_trajectories(tasks, loop_forever, VerifyConfig(workers=1, code_timeout_s=1))
    assert g.status == "incorrect" and grading_counts([g])["verify/code_timeouts"] == 1
    [g] = grade_trajectories(tasks, loop_forever, VerifyConfig(workers=1, code_timeout_s=1,
                                                                code_timeout_is_incorrect=False))
    assert g.status == "timeout" and grading_counts([g]) == {"verify/errors": 0, "verify/math_timeouts": 0,
                                                             "verify/code_timeouts": 1}
    assert GOLD_ERROR not in g.reason
