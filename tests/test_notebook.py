"""notebooks/diversity_collapse.ipynb and loop/report/ against a real MLflow store.

The store is written by the project's own Tracker with three rounds of constructed evaluations whose
per-prompt rows and summaries come from the real loop.evaluation.metrics.summarise, so the report reads exactly
what a loop logs. The notebook is executed top to bottom in a real kernel.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

from loop import report
from loop.evaluation import metrics, stats
from loop.records import Graded, Segment, Trajectory
from loop.report import plots
from loop.run.directory import write_json, write_jsonl
from loop.run.tracking import Tracker, TrackingConfig
from loop.tasks.base import Task

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "diversity_collapse.ipynb"
FIGURES = ["pass_at_k", "pass_at_1_and_max", "diversity", "coverage", "per_difficulty"]
TAGS = {"config_name": "t", "model": "m", "task": "arithmetic", "git_commit": "x"}
N = 8  # samples per problem

# Correct samples out of N for 12 problems (4 per level) in rounds 0, 1, 2: later rounds get the easy
# problems right more often but stop solving problems the base model solved now and then.
CORRECT = {
    "L1": [(4, 7, 8), (5, 8, 8), (3, 6, 8), (6, 8, 8)],
    "L2": [(2, 5, 7), (1, 3, 6), (3, 4, 8), (1, 0, 0)],
    "L3": [(1, 2, 0), (1, 0, 0), (0, 0, 1), (1, 0, 0)],
}
# Against round 0: round 1 loses L2/3, L3/1, L3/3; round 2 loses L2/3, L3/0, L3/1, L3/3 and gains L3/2.
LOST_GAINED = {1: (3, 0), 2: (4, 1)}
NLL = {0: 0.9, 1: 0.6, 2: 0.35}  # sharper distributions in later rounds
LENGTH = {0: 60, 1: 45, 2: 35}


def _tasks() -> list[Task]:
    return [Task(id=f"arith/{lvl}/{i}", prompt=f"problem {lvl}.{i}", verifier="math", family="arithmetic",
                 answer=str(10 * int(lvl[1]) + i), difficulty=lvl)
            for lvl, rows in CORRECT.items() for i in range(len(rows))]


def _graded(task: Task, rnd: int, sample: int, correct: bool) -> Graded:
    n_tok = LENGTH[rnd] + 3 * (sample % 4)
    if correct:
        status, answer = "correct", task.answer
    elif rnd == 0 and sample % 5 == 4:
        status, answer = "no_answer", None
    else:
        # The base model's wrong answers are spread out; later rounds repeat one wrong answer.
        status, answer = "incorrect", str(int(task.answer) + (1 + sample if rnd == 0 else 1))
    text = f"Work for {task.id}. The answer is \\boxed{{{answer}}}" if answer else f"Work for {task.id}."
    segments = [Segment("model", text, list(range(n_tok)))]
    tool = sample % 3 == 0
    if tool:  # a tool turn: code, the sandbox's output, the model's continuation
        segments = [Segment("model", "```python\nprint(1)\n```", [1, 2, 3]),
                    Segment("observation", "```output\n1\n```", [4, 5]), *segments]
    traj = Trajectory(task_id=task.id, sample=sample, prompt_token_ids=[0, 1],
                      segments=segments, finish_reason="length" if rnd == 0 and sample == 7 else "stop",
                      cumulative_logprob=-NLL[rnd] * (n_tok + 3 * tool), num_tool_calls=int(tool))
    return Graded(traj, status, answer, "constructed")


def _round(tasks: list[Task], rnd: int, rd: Path, like: int | None = None) -> tuple[dict[str, float], dict[str, Path]]:
    """Round `rnd`'s artifacts and metrics, with the samples of round `like` (default: its own)."""
    like = rnd if like is None else like
    counts = [c[like] for rows in CORRECT.values() for c in rows]
    graded = [_graded(t, like, s, s < c) for t, c in zip(tasks, counts) for s in range(N)]
    greedy = [_graded(t, like, 0, c >= N // 2) for t, c in zip(tasks, counts)]
    rows, summary = metrics.summarise(tasks, graded, greedy)
    rd.mkdir(parents=True)
    m = {f"eval/{k}": v for k, v in summary.items()}
    if rnd > 0:
        m.update({"pairs/pairs": 20.0 - 5 * rnd, "train/loss": 0.69 - 0.1 * rnd, "time/train_s": 12.0})
        write_jsonl(rd / "samples.jsonl", (g.trajectory.to_dict() for g in graded))
        write_jsonl(rd / "graded.jsonl", (g.to_dict() for g in graded))
        write_jsonl(rd / "pairs.jsonl", [{"task_id": tasks[0].id, "chosen": 0, "rejected": 7}])
    write_jsonl(rd / "eval_samples.jsonl", (g.to_dict() for g in graded))
    write_jsonl(rd / "eval_greedy.jsonl", (g.to_dict() for g in greedy))
    write_jsonl(rd / "eval_per_prompt.jsonl", rows)
    # As the flow does before logging: intervals and paired changes from the rounds' per-prompt rows.
    m.update(stats.round_statistics_from_dirs(rd, rd.parent / "round-00" if rnd else None,
                                              rd.parent / f"round-{rnd - 1:02d}" if rnd else None))
    write_json(rd / "metrics.json", m)
    return m, {p.name: p for p in sorted(rd.glob("*.json*"))}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """A store with an older one-round loop and the three-round loop the report is about."""
    tmp = tmp_path_factory.mktemp("store")
    cfg = TrackingConfig(uri=f"sqlite:///{tmp}/mlflow.db", experiment="exp", registered_model=None)
    tasks = _tasks()
    older = Tracker(cfg, "older-loop", TAGS)
    older.log_round(0, *_round(tasks, 0, tmp / "older" / "round-00"), adapter=None)
    older.finish()
    tracker = Tracker(cfg, "loop-a", TAGS)
    logged = {}
    for rnd in range(3):
        rd = tmp / "loop-a" / f"round-{rnd:02d}"
        m, artifacts = _round(tasks, rnd, rd)
        adapter = None
        if rnd > 0:
            adapter = rd / "adapter"
            adapter.mkdir()
            (adapter / "adapter_config.json").write_text("{}")
        tracker.log_round(rnd, m, artifacts, adapter)
        logged[rnd] = m
    tracker.finish()
    return {"uri": cfg.uri, "experiment": "exp", "parent": tracker.parent_id, "older": older.parent_id,
            "logged": logged, "tmp": tmp}


# Two loops of an ablation (bench/diversity.py): the same base model (round 0), then different rounds.
OPTION_PLANS = {"ablation-default": (0, 1, 2), "ablation-rarity": (0, 2, 1)}


@pytest.fixture(scope="module")
def ablation(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("ablation")
    cfg = TrackingConfig(uri=f"sqlite:///{tmp}/mlflow.db", experiment="ablation", registered_model=None)
    for name, plan in OPTION_PLANS.items():
        tracker = Tracker(cfg, name, TAGS)
        for rnd, like in enumerate(plan):
            tracker.log_round(rnd, *_round(_tasks(), rnd, tmp / name / f"round-{rnd:02d}", like), adapter=None)
        tracker.finish()
    return {"uri": cfg.uri}


def test_options_figure_compares_loops_at_their_last_round_with_paired_bands(ablation):
    from matplotlib.collections import PolyCollection

    datas = report.load_loops(ablation["uri"], "ablation")
    assert list(datas) == list(OPTION_PLANS)
    fig = report.plot_options(datas)
    ax, dx = fig.axes
    assert "round 2" in ax.get_title()
    lines = {ln.get_label(): ln for ln in ax.lines}
    assert set(lines) == {"base model (round 0)", *OPTION_PLANS}
    pp = {name: d.per_prompt[d.per_prompt["round"] == 2].set_index("task_id") for name, d in datas.items()}
    ks = [1, 2, 4, 8]
    for name in OPTION_PLANS:
        assert list(lines[name].get_ydata()) == pytest.approx([pp[name][f"pass@{k}"].mean() for k in ks])
    # The difference is rarity's round 2 (round-1 samples) minus default's round 2, over the same problems.
    [diff] = [ln for ln in dx.lines if ln.get_label() == "ablation-rarity"]
    want = [(pp["ablation-rarity"][f"pass@{k}"] - pp["ablation-default"][f"pass@{k}"]).mean() for k in ks]
    assert list(diff.get_ydata()) == pytest.approx(want) and min(want) < 0 < max(want)
    assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 2  # a band per option
    [band] = [c for c in dx.collections if isinstance(c, PolyCollection)]
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.min() < min(want) and ys.max() > max(want)  # the paired band contains the difference
    with pytest.raises(ValueError, match="no finished round 3"):
        report.plot_options(datas, rnd=3)
    with pytest.raises(ValueError, match="baseline 'nope'"):
        report.plot_options(datas, baseline="nope")


def test_load_loop_reads_the_latest_loop_by_default_and_by_either_id(store):
    default = report.load_loop(store["uri"], "exp")
    assert default.parent_run_id == store["parent"] and default.ratchet_run_id == "loop-a"
    assert report.load_loop(store["uri"], "exp", store["parent"]).parent_run_id == store["parent"]
    older = report.load_loop(store["uri"], "exp", "older-loop")
    assert older.parent_run_id == store["older"] and older.rounds == [0]
    with pytest.raises(ValueError, match="no loop run with ratchet or MLflow run id 'nope'"):
        report.load_loop(store["uri"], "exp", "nope")
    with pytest.raises(FileNotFoundError, match="no MLflow store"):
        report.load_loop(f"sqlite:///{store['tmp']}/missing.db", "exp")

    assert default.rounds == [0, 1, 2]
    for rnd, m in store["logged"].items():
        assert default.metrics.loc[rnd, "eval/pass_at_1"] == pytest.approx(m["eval/pass@1"])
        assert default.metrics.loc[rnd, "eval/pass_at_8"] == pytest.approx(m["eval/pass@8"])
    assert len(default.per_prompt) == 3 * 12 and len(default.samples) == 3 * 12 * N
    report.cross_check(default)
    table = report.pass_at_k_table(default.metrics)
    assert list(table.columns) == [1, 2, 4, 8]
    # Round 2 beats the base model at pass@1 but solves fewer problems at pass@8.
    assert table.loc[2, 1] > table.loc[0, 1] and table.loc[2, 8] < table.loc[0, 8]
    assert report.crossover_k(table)[2] is not None


def test_report_draws_intervals_and_paired_changes(store):
    from matplotlib.collections import PolyCollection
    from matplotlib.container import ErrorbarContainer

    data = report.load_loop(store["uri"], "exp", "loop-a")
    st = report.round_stats(data.per_prompt)
    # The logged intervals (at step = round on the parent) are the ones the per-problem artifact gives.
    for rnd in data.rounds:
        for key in ("eval/pass@1_low", "eval/pass@8_high", "eval/greedy_acc_se"):
            assert data.metrics.loc[rnd, key.replace("@", "_at_")] == pytest.approx(st.loc[rnd, key])
    for rnd in (1, 2):
        for key in ("vs_round0/pass@1", "vs_round0/pass@1_low", "vs_round0/pass@8_p", "vs_prev/maj@8_high"):
            assert data.metrics.loc[rnd, key.replace("@", "_at_")] == pytest.approx(st.loc[rnd, key])
    assert pd.isna(data.metrics.loc[0].get("vs_round0/pass_at_1", float("nan")))
    assert st.loc[2, "eval/pass@1_low"] < st.loc[2, "eval/pass@1"] < st.loc[2, "eval/pass@1_high"]
    changes = report.change_table(data)
    assert set(changes.index.get_level_values("metric")) == {"pass@1", "pass@8", "maj@8", "greedy_acc"}
    assert changes.loc[(2, "pass@1"), "vs round 0"].startswith("+")
    # Every accuracy figure carries its intervals: bands on pass@k, error bars elsewhere.
    fig = report.plot_pass_at_k(data)
    assert all(any(isinstance(c, PolyCollection) for c in ax.collections) for ax in fig.axes)
    for plot, axes in ((report.plot_headline, 1), (report.plot_coverage, 1), (report.plot_breakdown, 3)):
        fig = plot(data)
        assert sum(any(isinstance(c, ErrorbarContainer) for c in ax.containers) for ax in fig.axes) == axes, plot


def test_each_round_gets_a_sentence_that_agrees_with_its_intervals(store):
    data = report.load_loop(store["uri"], "exp", "loop-a")
    st = report.round_stats(data.per_prompt)
    sentences = report.pass_at_k_verdicts(data)
    n = int(data.per_prompt["n"].min())
    assert len(sentences) == len(data.rounds) - 1 + (n < 16)
    for rnd, text in zip(data.rounds[1:], sentences):
        assert text.startswith(f"round {rnd} against round 0")
        up1, down_k = st.loc[rnd, "vs_round0/pass@1_low"] > 0, st.loc[rnd, "vs_round0/pass@8_high"] < 0
        assert ("Collapse at large k" in text) == (up1 and down_k), text
        assert ("Sharpening without collapse" in text) == (up1 and not down_k), text
        if st.loc[rnd, "vs_round0/pass@1_low"] <= 0 <= st.loc[rnd, "vs_round0/pass@1_high"] and not down_k:
            assert "within noise" in text.lower(), text
    if n < 16:
        assert f"With {n} samples per problem" in sentences[-1] and "cannot be judged" in sentences[-1]
    # p-values as a reader takes them, never 0.0000.
    ps = report.change_table(data).filter(like="p (").stack()
    assert all(isinstance(p, str) and p != "0.0000" for p in ps)


def test_coverage_counts_lost_and_gained_problems():
    rows = [{"round": r, "task_id": t, "correct": c} for r, per_task in enumerate([
        {"a": 3, "b": 1, "c": 0, "d": 0},   # round 0 solves a, b
        {"a": 5, "b": 0, "c": 2, "d": 0},   # loses b, gains c
        {"a": 0, "b": 0, "c": 1, "d": 4},   # loses a, b; gains c, d
    ]) for t, c in per_task.items()]
    cov = report.coverage(pd.DataFrame(rows))
    assert cov.loc[:, ["solved", "lost", "gained"]].values.tolist() == [[2, 0, 0], [2, 1, 1], [2, 2, 2]]
    assert (cov["num_prompts"] == 4).all()
    with pytest.raises(ValueError, match="different set of problems"):
        report.coverage(pd.DataFrame(rows[:-1]))


def test_coverage_of_the_logged_loop(store):
    cov = report.coverage(report.load_loop(store["uri"], "exp", "loop-a").per_prompt)
    assert {r: (cov.loc[r, "lost"], cov.loc[r, "gained"]) for r in (1, 2)} == LOST_GAINED


def test_crossover_k():
    table = pd.DataFrame({1: [0.3, 0.5, 0.2, 0.1, 0.4], 2: [0.5, 0.55, 0.3, 0.2, 0.5], 4: [0.7, 0.6, 0.5, 0.3, 0.6],
                          8: [0.8, 0.6, 0.9, 0.4, 0.7]}, index=[0, 1, 2, 3, 4])
    # Round 1 is above round 0 at k=1, 2 and below from k=4 on; round 2 ends above round 0; round 3 is below it at
    # every k (it never was above: no crossover); round 4 is above at k=1, level at k=2, then below.
    assert report.crossover_k(table) == {1: 4, 2: None, 3: None, 4: 4}


def test_notebook_runs_unattended_and_writes_every_figure(store, ablation, tmp_path, monkeypatch):
    out = tmp_path / "figures"
    monkeypatch.setenv("RATCHET_ABLATION_URI", ablation["uri"])
    monkeypatch.setenv("RATCHET_TRACKING_URI", store["uri"])
    monkeypatch.setenv("RATCHET_EXPERIMENT", "exp")
    monkeypatch.setenv("RATCHET_RUN_ID", "loop-a")
    monkeypatch.setenv("RATCHET_FIGURES_DIR", str(out))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Raises CellExecutionError (with the traceback) when any cell fails.
    NotebookClient(nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(ROOT)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{f}.png" for f in FIGURES + ["options"])
    for f in FIGURES + ["options"]:
        assert (out / f"{f}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f
        assert (out / f"{f}.png").stat().st_size > 10_000, f
    # The figures are shown inline too, not only saved.
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == len(FIGURES) + 1
    # It reported on the loop asked for.
    text = json.dumps([c.outputs for c in nb.cells if c.cell_type == "code"])
    assert "loop-a" in text and store["parent"] in text
    assert "Downloading artifacts" not in text  # MLflow's progress bars are silenced


def _readme_notebook_command() -> str:
    """The command the docs give for the notebook (docs/diversity.md: its line that runs `jupyter execute`)."""
    readme = (ROOT / "docs" / "diversity.md").read_text()
    [line] = [ln for ln in readme.splitlines() if "jupyter execute" in ln and not ln.lstrip().startswith("#")]
    return line.strip().strip("`")


def test_the_documented_notebook_command_runs_as_written_from_the_repository_root(tmp_path):
    """The documented command, run by a shell from the root of a checkout whose store is the default ./mlflow.db (a
    copy of this checkout's code, so the real store and figures stay untouched), writes every figure."""
    root = tmp_path / "checkout"
    (root / "notebooks").mkdir(parents=True)
    shutil.copy(NOTEBOOK, root / "notebooks" / NOTEBOOK.name)
    for name in ("loop", "verifiers", ".venv"):
        (root / name).symlink_to(ROOT / name)
    # The loop's default store (experiment 'ratchet'), written where `ratchet run` in the root puts it.
    cfg = TrackingConfig(uri=f"sqlite:///{root}/mlflow.db", registered_model=None)
    tracker = Tracker(cfg, "demo", TAGS)
    for rnd in range(2):
        tracker.log_round(rnd, *_round(_tasks(), rnd, tmp_path / "runs" / f"round-{rnd:02d}"), adapter=None)
    tracker.finish()
    command = _readme_notebook_command()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RATCHET_", "MLFLOW_"))}
    done = subprocess.run(["bash", "-c", command], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    assert sorted(p.name for p in (root / "figures").iterdir()) == sorted(f"{f}.png" for f in FIGURES), command
    assert not (root / "notebooks" / "mlflow.db").exists()  # no empty store made beside the notebook


def test_a_saved_figure_says_which_run_commit_and_date_it_was_drawn_from(store, tmp_path):
    from datetime import datetime, timezone

    data = report.load_loop(store["uri"], "exp", "loop-a")
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    assert data.stamp == f"run loop-a · commit {TAGS['git_commit']} · {today}"
    fig = report.plot_pass_at_k(data)
    assert report.save_figure(fig, tmp_path, "pass_at_k", stamp=data.stamp).exists()
    assert [t.get_text() for t in fig.texts] == [data.stamp]
    fig = report.plot_headline(data)
    report.save_figure(fig, tmp_path, "headline")
    assert fig.texts == []


def test_figures_fit_the_data(store):
    data = report.load_loop(store["uri"], "exp", "loop-a")
    # pass@k on its whole range; differences symmetric about 0, at least ±0.1 wide.
    ax, dx = report.plot_pass_at_k(data).axes
    assert ax.get_ylim() == pytest.approx((-0.02, 1.02))
    low, high = dx.get_ylim()
    assert low == pytest.approx(-high) and high >= 0.1
    assert report.plot_headline(data).axes[0].get_ylim() == pytest.approx((-0.02, 1.02))
    # Distinct answers out of 8 samples take fewer than 8 levels: points, no box.
    a_dist = report.plot_diversity(data).axes[0]
    assert "points" in a_dist.get_title() and a_dist.collections
    assert a_dist.get_ylim() == pytest.approx((0, N + 0.5))
    # A box only over enough distinct values.
    import matplotlib.pyplot as plt

    frame = pd.DataFrame({"round": [0] * 20 + [1] * 20, "v": [i / 20 for i in range(20)] * 2})
    assert plots._distribution_by_round(plt.subplots()[1], frame, "v", [0, 1]) == "box"
    assert plots._distribution_by_round(plt.subplots()[1], frame.head(4).assign(round=0), "v", [0]) == "points"
