"""Preference pairs from constructed graded trajectories (loop/pairs.py)."""
from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from loop.pairs import (PairsConfig, PreferencePair, build_pairs, load_pairs, rehearsal_samples, save_pairs,
                        select_samples)
from loop.records import Graded, Segment, Trajectory

PROMPT = [1, 2, 3]


def graded(task: str, sample: int, status: str = "correct", *, tokens: list[int] | None = None,
           obs: list[int] | None = None, finish: str = "stop", logprob: float = -1.0, prompt=PROMPT) -> Graded:
    """A two-turn trajectory: model tokens, optionally a tool observation, then a final model turn."""
    tokens = tokens if tokens is not None else [100 + sample, 7]
    segments = [Segment("model", "m", tokens)]
    if obs is not None:
        segments += [Segment("observation", "o", obs), Segment("model", "a", [9])]
    t = Trajectory(task, sample, list(prompt), segments, finish_reason=finish, cumulative_logprob=logprob)
    return Graded(t, status, None, "test")


def ids(pairs: list[PreferencePair]) -> list[tuple[str, int, int]]:
    return [(p.task_id, p.chosen.sample, p.rejected.sample) for p in pairs]


def test_random_pairs_one_correct_vs_one_wrong_per_mixed_prompt():
    data = [graded("a", 0), graded("a", 1, "incorrect"), graded("a", 2, "no_answer"), graded("a", 3),
            graded("b", 0), graded("b", 1),  # all correct
            graded("c", 0, "incorrect"), graded("c", 1, "no_answer"),  # all wrong
            graded("d", 0, "timeout"), graded("d", 1, "timeout")]  # nothing usable
    pairs, stats = build_pairs(data, PairsConfig())
    assert len(pairs) == 1
    (p,) = pairs
    assert p.task_id == "a" and p.strategy == "random"
    assert p.chosen.sample in (0, 3) and p.rejected.sample in (1, 2)
    assert p.prompt_token_ids == PROMPT
    s = stats.to_dict()
    assert (s["prompts"], s["prompts_with_pairs"], s["prompts_all_correct"], s["prompts_all_wrong"],
            s["prompts_ungradeable"], s["pairs"]) == (4, 1, 1, 1, 1, 1)
    assert s["prompts"] == sum(s[k] for k in ("prompts_with_pairs", "prompts_all_correct", "prompts_all_wrong",
                                              "prompts_ungradeable"))
    assert s["dropped_ungradeable"] == 2 and s["samples"] == 10 and s["samples_used"] == 8
    assert all(isinstance(v, float) for v in s.values())


def test_cut_off_samples_are_rejected_candidates_never_chosen():
    data = [graded("a", 0), graded("a", 1, "incorrect", finish="length"), graded("a", 2, "incorrect", finish="context"),
            graded("a", 3, "incorrect", finish="max_turns")]
    pairs, stats = build_pairs(data, PairsConfig(strategy="all"))
    assert sorted(ids(pairs)) == [("a", 0, 1), ("a", 0, 2), ("a", 0, 3)]
    assert stats.dropped_truncated == 0

    pairs, stats = build_pairs(data, PairsConfig(keep_truncated=False))
    assert pairs == [] and stats.dropped_truncated == 3 and stats.prompts_all_correct == 1

    # A cut-off sample the verifier still graded correct (e.g. verify.cutoff_is_wrong off, and a last number that
    # happened to be right) did not finish: it is never a chosen sample, and not a rejected one either.
    data = [graded("b", 0, finish="length"), graded("b", 1, "incorrect"), graded("b", 2, finish="max_turns")]
    for strategy in ("random", "best_worst", "all"):
        pairs, stats = build_pairs(data, PairsConfig(strategy=strategy))
        assert pairs == [] and stats.dropped_cut_off_correct == 2 and stats.prompts_all_wrong == 1


def test_chosen_needs_marker_leaves_out_answers_found_by_the_fallback():
    def math(sample, status, rule):
        g = graded("a", sample, status)
        return Graded(g.trajectory, status, "4", f"answer '4' found by rule {rule}; gold '4'; equal")

    data = [math(0, "correct", "last_number"), math(1, "correct", "gsm8k_hashes"), math(2, "incorrect", "last_math"),
            math(3, "correct", "last_math")]
    pairs, stats = build_pairs(data, PairsConfig(strategy="all", chosen_needs_marker=True))
    assert ids(pairs) == [("a", 1, 2)] and stats.dropped_unmarked_correct == 2
    pairs, _ = build_pairs(data, PairsConfig(strategy="all"))
    assert sorted(ids(pairs)) == [("a", 0, 2), ("a", 1, 2), ("a", 3, 2)]


def test_timeouts_left_out_or_counted_as_incorrect():
    data = [graded("a", 0), graded("a", 1, "timeout"), graded("a", 2, "error")]
    pairs, stats = build_pairs(data, PairsConfig())
    assert pairs == [] and stats.dropped_ungradeable == 2

    pairs, stats = build_pairs(data, PairsConfig(timeout_as_incorrect=True))
    assert ids(pairs) == [("a", 0, 1)] and stats.dropped_ungradeable == 1  # an "error" never has a verdict


def test_never_pairs_equal_grades_and_drops_duplicates():
    same = [5, 6, 7]
    data = [graded("a", 0, tokens=same), graded("a", 1, tokens=same), graded("a", 2, tokens=[8]),
            graded("a", 3, "incorrect", tokens=[4]), graded("a", 4, "incorrect", tokens=[4]),
            graded("a", 5, "no_answer", tokens=[3])]
    pairs, stats = build_pairs(data, PairsConfig(strategy="all", max_pairs_per_prompt=100))
    assert stats.dropped_duplicates == 2
    assert sorted(ids(pairs)) == [("a", 0, 3), ("a", 0, 5), ("a", 2, 3), ("a", 2, 5)]
    for p in pairs:
        assert p.chosen.completion_token_ids != p.rejected.completion_token_ids
    # The same completion graded both ways has no trustworthy verdict: every copy is dropped.
    data = [graded("b", 0, tokens=same), graded("b", 1, "incorrect", tokens=same), graded("b", 2, "incorrect")]
    pairs, stats = build_pairs(data, PairsConfig())
    assert pairs == [] and stats.dropped_conflicting == 2 and stats.prompts_all_wrong == 1


def test_best_worst_by_length_and_by_logprob():
    data = [graded("a", 0, tokens=[1] * 5, logprob=-5.0),   # correct, long, likely (-1/token)
            graded("a", 1, tokens=[2] * 2, logprob=-4.0),   # correct, short, unlikely (-2/token)
            graded("a", 2, "incorrect", tokens=[3] * 3, logprob=-1.5),  # wrong, short, likely (-0.5/token)
            graded("a", 3, "incorrect", tokens=[4] * 6, logprob=-18.0)]  # wrong, long, unlikely (-3/token)
    pairs, _ = build_pairs(data, PairsConfig(strategy="best_worst"))
    assert ids(pairs) == [("a", 1, 3)]
    pairs, _ = build_pairs(data, PairsConfig(strategy="best_worst", by="logprob"))
    assert ids(pairs) == [("a", 1, 2)]


def test_all_is_capped_per_prompt_without_repeats():
    data = [graded("a", i) for i in range(4)] + [graded("a", 10 + i, "incorrect") for i in range(3)]
    pairs, _ = build_pairs(data, PairsConfig(strategy="all", max_pairs_per_prompt=100))
    assert len(pairs) == 12 and len(set(ids(pairs))) == 12
    pairs, stats = build_pairs(data, PairsConfig(strategy="all", max_pairs_per_prompt=5))
    assert len(pairs) == 5 == stats.pairs and len(set(ids(pairs))) == 5


def test_random_choice_is_seeded():
    data = [graded(f"t{k}", i, "correct" if i < 4 else "incorrect") for k in range(20) for i in range(8)]
    first, _ = build_pairs(data, PairsConfig(seed=1))
    again, _ = build_pairs(list(reversed(data)), PairsConfig(seed=1))
    other, _ = build_pairs(data, PairsConfig(seed=2))
    assert sorted(ids(first)) == sorted(ids(again))  # per-prompt generators: order of the input does not matter
    assert ids(first) != ids(other)
    assert len({p.chosen.sample for p in first}) > 1  # not always the first correct sample


def test_one_prompt_per_task_is_required():
    data = [graded("a", 0), graded("a", 1, "incorrect", prompt=[1, 2, 4])]
    with pytest.raises(ValueError, match="different prompt token sequences"):
        build_pairs(data, PairsConfig())


def test_save_load_round_trip_keeps_segments(tmp_path):
    data = [graded("a", 0, obs=[50, 51]), graded("a", 1, "incorrect", obs=[60])]
    pairs, _ = build_pairs(data, PairsConfig())
    path = save_pairs(tmp_path / "pairs.jsonl", pairs)
    assert len(path.read_text().splitlines()) == 1
    (loaded,) = load_pairs(path)
    assert loaded == pairs[0]
    assert [s.kind for s in loaded.chosen.segments] == ["model", "observation", "model"]
    assert loaded.chosen.completion_token_ids == [100, 7, 50, 51, 9]
    assert loaded.chosen.completion_mask == [1, 1, 0, 0, 1]
    assert loaded.rejected.completion_mask == [1, 1, 0, 1]
    assert save_pairs(tmp_path / "empty.jsonl", []) and load_pairs(tmp_path / "empty.jsonl") == []
    with pytest.raises(FileNotFoundError, match="pairs"):
        load_pairs(tmp_path / "missing.jsonl")
    bad = json.loads(path.read_text())
    bad["prompt_token_ids"] = [9, 9]
    (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match="same prompt"):
        load_pairs(tmp_path / "bad.jsonl")


def test_select_samples_for_kto_uses_the_same_drops():
    data = [graded("a", 0), graded("a", 1, "incorrect", finish="length"), graded("a", 2, "timeout"),
            graded("b", 0, "incorrect"), graded("b", 1, "incorrect", tokens=[100, 7])]  # b/1 duplicates b/0
    kept, stats = select_samples(data, PairsConfig(timeout_as_incorrect=True, keep_truncated=False))
    assert [(g.trajectory.task_id, g.trajectory.sample, g.status) for g in kept] == [
        ("a", 0, "correct"), ("a", 2, "incorrect"), ("b", 0, "incorrect")]
    assert stats.dropped_truncated == 1 and stats.dropped_duplicates == 1 and stats.prompts_with_pairs == 1


def test_config_rejects_unknown_and_invalid_keys():
    with pytest.raises(ValidationError, match="extra"):
        PairsConfig(stratgy="all")
    with pytest.raises(ValidationError):
        PairsConfig(strategy="best")
    with pytest.raises(ValidationError):
        PairsConfig(max_pairs_per_prompt=0)


def test_missing_log_probs_are_an_error_and_empty_means_are_left_out():
    # by: logprob ranks samples by their mean log-prob: a sample without one (None) is an error, never 0.
    data = [graded("a", 0), graded("a", 1, "incorrect"), graded("a", 2, "incorrect")]
    data[2].trajectory.cumulative_logprob = None
    with pytest.raises(ValueError, match="task a sample 2 has none"):
        build_pairs(data, PairsConfig(strategy="best_worst", by="logprob"))
    empty = [graded("a", 1, "incorrect", tokens=[]), graded("a", 0)]
    with pytest.raises(ValueError, match="no model token"):
        build_pairs(empty, PairsConfig(strategy="best_worst", by="logprob"))
    # No pair, no mean length: the keys are left out rather than reported as 0.
    _, stats = build_pairs([graded("b", 0)], PairsConfig())
    s = stats.to_dict()
    assert s["pairs"] == 0 and "chosen_model_tokens_mean" not in s and "rejected_model_tokens_mean" not in s


def _mixed_prompts(samples: int = 8) -> list[Graded]:
    """Prompt t{c} has c correct samples of `samples` (c = 1 .. samples-1), the rest wrong."""
    return [graded(f"t{c}", s, "correct" if s < c else "incorrect", tokens=[100 + s, c])
            for c in range(1, samples) for s in range(samples)]


def test_rarity_weighting_gives_pairs_in_proportion_to_one_minus_solve_rate():
    data = _mixed_prompts()
    base_cfg = dict(strategy="all", max_pairs_per_prompt=4)
    plain, _ = build_pairs(data, PairsConfig(**base_cfg))
    per_prompt = {t: sum(p.task_id == t for p in plain) for t in {p.task_id for p in plain}}
    weights = {f"t{c}": (8 - c) / 8 for c in range(1, 8)}
    mean = sum(per_prompt[t] * weights[t] for t in per_prompt) / sum(per_prompt.values())
    target = {t: per_prompt[t] * weights[t] / mean for t in per_prompt}

    counts_over_seeds = {t: [] for t in target}
    for seed in range(300):
        pairs, stats = build_pairs(data, PairsConfig(**base_cfg, prompt_weight="rarity", seed=seed))
        assert stats.pairs_before_weighting == sum(per_prompt.values()) == 4 * 7
        for t in target:
            got = [p for p in pairs if p.task_id == t]
            # floor or ceil of the target, and only the prompt's own correct-vs-wrong combinations
            assert int(target[t]) <= len(got) <= int(target[t]) + 1
            assert all(p.chosen.sample < int(t[1:]) <= p.rejected.sample for p in got)
            counts_over_seeds[t].append(len(got))
        assert abs(stats.pairs - stats.pairs_before_weighting) <= len(target)
    # In expectation each prompt gets exactly its target: the weight holds on average, not just in rank.
    for t, counts in counts_over_seeds.items():
        assert sum(counts) / len(counts) == pytest.approx(target[t], abs=0.1)
    rare, common = counts_over_seeds["t1"], counts_over_seeds["t7"]
    assert min(rare) > max(common)


def test_rarity_weighting_repeats_a_single_pair_and_can_drop_a_nearly_solved_prompt():
    # One pair per prompt (random): a rarely solved prompt's pair repeats, a nearly always solved one's goes.
    data = [graded("rare", s, "correct" if s == 0 else "incorrect") for s in range(8)]
    data += [graded("easy", s, "incorrect" if s == 0 else "correct") for s in range(8)]
    pairs, stats = build_pairs(data, PairsConfig(prompt_weight="rarity"))
    # weights 7/8 and 1/8, mean 1/2: targets 1.75 and 0.25
    rare = [p for p in pairs if p.task_id == "rare"]
    assert len(rare) in (1, 2) and len({(p.chosen.sample, p.rejected.sample) for p in rare}) == 1
    assert len([p for p in pairs if p.task_id == "easy"]) in (0, 1)
    assert stats.prompts_with_pairs == 2 and stats.pairs_before_weighting == 2


def test_uniform_weighting_is_the_strategy_unchanged():
    data = _mixed_prompts()
    for strategy in ("random", "best_worst", "all"):
        a, sa = build_pairs(data, PairsConfig(strategy=strategy))
        b, _ = build_pairs(data, PairsConfig(strategy=strategy, prompt_weight="uniform"))
        assert ids(a) == ids(b) and "pairs_before_weighting" not in sa.to_dict()


def test_rehearsal_draws_base_model_correct_samples_of_prompts_solved_every_time():
    # This round: a and b are solved by every usable sample, c is mixed, d all wrong, e solved but cut off only.
    now = ([graded("a", i) for i in range(4)] + [graded("b", i) for i in range(4)]
           + [graded("c", 0), graded("c", 1, "incorrect")] + [graded("d", i, "incorrect") for i in range(2)]
           + [graded("e", 0), graded("e", 1, "incorrect", finish="length")])
    # The base model's samples: a had two correct ones (and a wrong one), b only wrong or cut-off ones.
    base = ([graded("a", 0, "incorrect"), graded("a", 1), graded("a", 2)] + [graded("b", 0, "incorrect"),
            graded("b", 1, finish="length")] + [graded(t, 0) for t in "cde"])
    cfg = PairsConfig(rehearsal=1.0, keep_truncated=False)
    picked = rehearsal_samples(now, base, 10, cfg)
    # a qualifies with a base correct sample; b has none usable; c, d are not solved every time; e's one usable
    # sample is correct (the cut-off one is dropped, as in pairing), so e qualifies too.
    assert [(g.trajectory.task_id, g.correct) for g in picked] == [("a", True), ("e", True)]
    assert picked[0].trajectory.sample in (1, 2) and all(g in base for g in picked)
    assert rehearsal_samples(now, base, 10, cfg) == picked  # seeded
    # round(share x pairs) prompts at most: a seeded subset.
    assert len(rehearsal_samples(now, base, 2, PairsConfig(rehearsal=0.5, keep_truncated=False))) == 1
    assert rehearsal_samples(now, base, 10, PairsConfig()) == []
    seen = {g.trajectory.sample for s in range(40) for g in rehearsal_samples(now, base, 1, PairsConfig(rehearsal=1, seed=s))
            if g.trajectory.task_id == "a"}
    assert seen == {1, 2}  # both base correct samples of a get chosen for some seed
    with pytest.raises(ValueError, match="rehearsal needs the same prompts every round"):
        rehearsal_samples(now, [graded("a", 0, prompt=[9, 9])], 10, cfg)


def test_rehearsal_is_checked_at_config_load():
    from loop.config import RunConfig

    base = {"name": "t", "model": "m", "train_tasks": {"family": "arithmetic", "split": "train"},
            "eval": {"tasks": {"family": "arithmetic", "split": "eval"}}}
    assert RunConfig(**base, pairs={"rehearsal": 0.25}, train={"rehearsal_coef": 0.5}).train.rehearsal_coef == 0.5
    with pytest.raises(ValidationError, match="with train.algorithm: kto set pairs.rehearsal: 0"):
        RunConfig(**base, pairs={"rehearsal": 0.25}, train={"algorithm": "kto"})
    with pytest.raises(ValidationError, match="with train.algorithm: sft set pairs.rehearsal: 0"):
        RunConfig(**base, pairs={"rehearsal": 0.25}, train={"algorithm": "sft"})
    with pytest.raises(ValidationError, match="pairs.rehearsal is 0"):
        RunConfig(**base, train={"rehearsal_coef": 0.5})
    with pytest.raises(ValidationError, match="rehearsal"):
        PairsConfig(rehearsal=1.5)


def test_the_pairs_stage_saves_the_rehearsal_samples_beside_the_pairs(tmp_path):
    # The flow's pairs stage (what the train stage reads back): rehearsal.jsonl next to pairs.jsonl, drawn from
    # round 1's graded samples in later rounds and from the round's own in round 1.
    from flows.self_improve import pairs as pairs_stage
    from loop.config import RunConfig
    from loop.run.directory import read_jsonl, write_jsonl

    cfg = RunConfig(name="t", model="m", train_tasks={"family": "arithmetic", "split": "train"},
                    eval={"tasks": {"family": "arithmetic", "split": "eval"}}, pairs={"rehearsal": 1.0})
    round1 = [graded("a", 0), graded("a", 1), graded("b", 0), graded("b", 1, "incorrect")]
    round2 = [graded("a", 0), graded("a", 3), graded("b", 0), graded("b", 2, "incorrect")]
    for name, rows in (("r1", round1), ("r2", round2)):
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / "graded.jsonl", (g.to_dict() for g in rows))
    for rnd in ("r1", "r2"):
        metrics = pairs_stage.fn(cfg, tmp_path / rnd / "graded.jsonl", tmp_path / "r1" / "graded.jsonl",
                                 tmp_path / rnd / "pairs.jsonl")
        [saved] = [Graded.from_dict(d) for d in read_jsonl(tmp_path / rnd / "rehearsal.jsonl")]
        assert saved.trajectory.task_id == "a" and saved.correct and saved.trajectory.sample in (0, 1)  # round 1's
        assert metrics["pairs/rehearsal"] == 1 and metrics["pairs/pairs"] == 1
