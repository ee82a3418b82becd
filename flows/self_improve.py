"""The Prefect flow: N rounds of generate -> verify -> pairs -> DPO -> evaluate -> log.

Round 0 evaluates the base model (the baseline every later round is compared with). Each stage is a Prefect task that
writes its output into the run directory and marks itself done, so re-running the same run id resumes where it stopped
(see loop/run/directory.py). One vLLM engine serves every round of a flow run; each round's adapter is hot-loaded with a
new LoRA id, never merged, never restarting vLLM. Training runs in this process while the engine sleeps (on CUDA: vLLM's
sleep mode frees its GPU memory for the trainer; vLLM-CPU has none) and the trainer's memory is freed after each round;
every stage's peak memory goes to the round's metrics (`memory/<stage>_peak_rss_mb`; on CUDA also
`_peak_cuda_allocated_mb` and `_gpu_used_mb`). On CPU, with loop/generation/vllm_cpu_lora.py, serving the adapter costs
about what restarting vLLM on a merged model would (measured in bench/RESULTS.md), so the engine is kept and nothing is
merged.
"""
from __future__ import annotations

import functools
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.exceptions import MissingContextError

from flows.console import round_line, say, stage_line
from flows.round_table import markdown as round_markdown, primary_line
from loop.config import RunConfig, check_model, load_config
from loop.evaluation.evaluate import evaluate_policy
from loop.evaluation.stats import (PER_PROMPT, detectable_change_from_rates_note, detectable_change_note,
                                   round_statistics_from_dirs, training_statistics)
from loop.generation import rollout
from loop.generation.engine import Engine, VLLMEngine
from loop.grading import grade_trajectories, grading_counts
from loop.models.resolve import ResolvedModel, resolve_model
from loop.pairs import build_pairs, load_pairs, rehearsal_samples, rft_samples, save_pairs, select_samples
from loop.records import Graded, Trajectory
from loop.run.directory import RunDir, RunLocked, read_jsonl, write_json, write_jsonl
from loop.run.peak_memory import PeakMemory
from loop.run.tracking import GIT_COMMIT_TAG, RUN_ID_TAG, Tracker, git_commit, resolve_uri
from loop.tasks import check_disjoint, count_clusters, load_round_tasks, load_tasks
from loop.tasks.base import Task
from loop.training.update import train_round

STAGES = ("generate", "verify", "pairs", "train", "evaluate", "log")


def _load_trajectories(path: Path) -> list[Trajectory]:
    return [Trajectory.from_dict(d) for d in read_jsonl(path)]


def _load_graded(path: Path) -> list[Graded]:
    return [Graded.from_dict(d) for d in read_jsonl(path)]


@task(name="generate", cache_policy=NONE)
def generate(engine: Engine, tasks: list[Task], cfg: RunConfig, r: int, adapter: Path | None,
             adapter_id: int | None, out: Path) -> dict[str, float]:
    """The round's samples (samples.jsonl). Finished trajectories are kept in a checkpoint as they end, so a stage
    that fails or is stopped partway resumes with the rest (loop.generation.rollout.generate_many)."""
    t0 = time.perf_counter()
    checkpoint = out.with_name("samples.partial.jsonl")
    [trajs] = rollout.generate_many(engine, [(tasks, cfg.sampling)], round=r, adapter=adapter, adapter_id=adapter_id,
                                    checkpoint=checkpoint)
    dt = time.perf_counter() - t0
    write_jsonl(out, (t.to_dict() for t in trajs))
    checkpoint.unlink(missing_ok=True)
    tokens = sum(t.num_model_tokens for t in trajs)
    out_metrics = {"time/generate_s": dt, "generate/samples": len(trajs), "generate/tokens": tokens,
                   **({"generate/tokens_per_s": tokens / dt} if dt > 0 else {})}
    if cfg.sampling.tools:
        errors = [kind for t in trajs for kind in t.tool_errors]
        out_metrics.update({"generate/tool_calls_per_sample": sum(t.num_tool_calls for t in trajs) / len(trajs),
                            "generate/tool_use_frac": sum(t.num_tool_calls > 0 for t in trajs) / len(trajs),
                            "generate/tool_errors": float(len(errors)),
                            **{f"generate/tool_errors/{k}": float(errors.count(k)) for k in sorted(set(errors))}})
    return out_metrics


@task(name="verify", cache_policy=NONE)
def verify(tasks_by_id: dict[str, Task], cfg: RunConfig, samples: Path, out: Path, previous: Path | None,
           grade: Callable | None = None) -> dict[str, float]:
    """The round's graded samples (graded.jsonl) and what they say about the policy on its training tasks: right
    share, cut-off share, lengths, and (train_per_cluster.jsonl) the right share per cluster (gsm-symbolic
    template), with the paired change against the previous round's clusters (`previous`: its graded.jsonl): with
    fresh tasks every round, that is the near-transfer signal (new problems of the templates trained on)."""
    t0 = time.perf_counter()
    graded = (grade or grade_trajectories)(tasks_by_id, _load_trajectories(samples), cfg.verify)
    write_jsonl(out, (g.to_dict() for g in graded))
    before = _load_graded(previous) if previous is not None and previous.exists() else None
    per_cluster, summary = training_statistics(graded, tasks_by_id, before, _round_tasks_of(previous))
    write_jsonl(out.with_name("train_per_cluster.jsonl"), per_cluster)
    return {"time/verify_s": time.perf_counter() - t0,
            "train_samples/correct": sum(g.correct for g in graded),
            "train_samples/timeout": sum(g.status == "timeout" for g in graded), **summary,
            **grading_counts(graded)}


def _round_tasks_of(graded_path: Path | None) -> dict[str, Task] | None:
    """The tasks of the round whose graded.jsonl is `graded_path` (its tasks.jsonl), by id; None if not recorded."""
    path = None if graded_path is None else graded_path.with_name("tasks.jsonl")
    return None if path is None or not path.exists() else {d["id"]: Task(**d) for d in read_jsonl(path)}


@task(name="build-pairs", cache_policy=NONE)
def pairs(cfg: RunConfig, graded_path: Path, base_graded_path: Path, out: Path) -> dict[str, float]:
    """The round's pairs (pairs.jsonl) and, with pairs.rehearsal, the base model's samples to rehearse
    (rehearsal.jsonl, from round 1's graded samples: round 1 samples the base model)."""
    t0 = time.perf_counter()
    graded = _load_graded(graded_path)
    built, stats = build_pairs(graded, cfg.pairs)
    extra = {}
    if cfg.pairs.rehearsal:
        base = graded if base_graded_path == graded_path else _load_graded(base_graded_path)
        rehearse = rehearsal_samples(graded, base, len(built), cfg.pairs)
        write_jsonl(out.with_name("rehearsal.jsonl"), (g.to_dict() for g in rehearse))
        extra["pairs/rehearsal"] = float(len(rehearse))
    save_pairs(out, built)
    return {"time/pairs_s": time.perf_counter() - t0, **{f"pairs/{k}": v for k, v in stats.to_dict().items()}, **extra}


# log_prints off: `datasets` hashes functions with dill, which captures dis.dis output through print(); routed
# to the Prefect logger, that output floods the log with bytecode and dill sees no globals.
@task(name="train", cache_policy=NONE, log_prints=False)
def train(model_path: Path, cfg: RunConfig, pairs_path: Path, graded_path: Path, init_adapter: Path | None,
          out: Path, trainer: Callable | None = None) -> dict[str, float]:
    logger = get_run_logger()
    # KTO trains on the samples pairing would use (loop.pairs.select_samples: cut-off samples, duplicates and
    # verifier timeouts follow the same `pairs` rules), unpaired; SFT (RFT) on one correct sample per prompt of those.
    if cfg.train.algorithm == "dpo":
        data, why = load_pairs(pairs_path), "no preference pairs (every prompt all-correct or all-wrong)"
    elif cfg.train.algorithm == "kto":
        data, _ = select_samples(_load_graded(graded_path), cfg.pairs)
        why = "no usable graded sample (all cut off, timed out or conflicting)"
    else:
        data = rft_samples(_load_graded(graded_path), cfg.pairs, cfg.train.sft_pick or "shortest")
        why = "no usable correct sample (every prompt wrong, cut off, timed out or conflicting)"
    if not data:
        logger.warning(f"round has {why}: skipping training; the previous adapter stays current")
        return {"train/skipped": 1.0}
    rehearsal = []
    if cfg.pairs.rehearsal:
        rehearsal = [g.trajectory for g in _load_graded(pairs_path.with_name("rehearsal.jsonl"))]
    t0 = time.perf_counter()
    result = (trainer or train_round)(model_path, data, cfg.train, init_adapter=init_adapter, out_dir=out,
                                      rehearsal=rehearsal)
    return {"time/train_s": time.perf_counter() - t0, "train/skipped": 0.0, **result.metrics}


@task(name="evaluate", cache_policy=NONE)
def evaluate(engine: Engine, tasks: list[Task], cfg: RunConfig, r: int, adapter: Path | None,
             adapter_id: int | None, out_dir: Path, grade: Callable | None = None) -> dict[str, float]:
    return evaluate_policy(engine, tasks, cfg.eval, cfg.verify, out_dir, seed_round=0 if cfg.eval.common_seeds else r,
                           adapter=adapter, adapter_id=adapter_id, grade=grade)


@task(name="log-round", cache_policy=NONE, retries=2, retry_delay_seconds=5)
def log_round(tracker: Tracker, r: int, metrics: dict[str, float], round_dir: Path, adapter: Path | None,
              note: str | None = None) -> str:
    artifacts = {p.name: p for p in sorted(round_dir.glob("*.jsonl")) + [round_dir / "metrics.json"] if p.exists()}
    return tracker.log_round(r, metrics, artifacts, adapter, note=note)


@flow(name="self-improve", log_prints=True)
def self_improve(config_path: str, rounds: int | None = None, run_id: str | None = None,
                 more_rounds: int | None = None) -> list[dict[str, Any]]:
    """Run (or resume) the loop described by the YAML config at `config_path`: up to round `rounds` (None: the
    config's), or `more_rounds` rounds beyond the last finished one (what a scheduled deployment runs each time it
    is triggered: the same loop goes on from its last adapter). With nothing left to do it returns the finished
    rounds without starting vLLM."""
    logger = get_run_logger()
    if rounds is not None and more_rounds is not None:
        raise ValueError("give rounds (the total) or more_rounds (beyond the last finished round), not both")
    cfg = load_config(config_path)
    run = RunDir(cfg.run_dir, run_id or cfg.name)
    try:
        run.lock()
    except RunLocked as e:
        logger.warning(f"skipping: {e}")
        return []
    try:
        if more_rounds is not None:
            finished = run.completed_rounds()
            rounds = (max(finished) if finished else 0) + more_rounds
        cfg = load_config(config_path, rounds=rounds)
        if all(run.done(r, "round") for r in range(cfg.rounds + 1)):
            logger.info(f"nothing to do: run {run.run_id} has finished rounds 0-{cfg.rounds}")
            progress(f"run {run.run_id}: rounds 0-{cfg.rounds} are finished; nothing to do (vLLM not started)")
            return [{"round": r, **json.loads((run.round(r) / "metrics.json").read_text())}
                    for r in range(cfg.rounds + 1)]
        return _run(cfg, run, logger)
    finally:
        run.unlock()


@dataclass
class Loop:
    """What every round of one flow run shares: the config, run directory, tasks, tracker and vLLM engine (with
    `cluster:`, a loop.cluster.engines.EnginePool of replicas, with the Ray grader and trainer)."""

    cfg: RunConfig
    run: RunDir
    model: ResolvedModel
    eval_tasks: list[Task]
    tracker: Tracker
    engine: Engine
    grade: Callable | None = None
    """None: loop.grading.grade_trajectories in this process."""
    trainer: Callable | None = None
    """None: loop.training.update.train_round in this process."""
    ray_connected: bool = False
    """This flow run joined the Ray cluster (and leaves it at the end)."""

    def round_tasks(self, r: int) -> list[Task]:
        """Round `r`'s training tasks: as recorded in its folder (tasks.jsonl), so a resumed round samples the very
        tasks it started with; else drawn (loop.tasks.load_round_tasks: new ones each round with
        train_tasks.fresh_per_round), checked against the evaluation set, and recorded."""
        path = self.run.round(r) / "tasks.jsonl"
        if path.exists():
            return [Task(**d) for d in read_jsonl(path)]
        tasks, note = load_round_tasks(self.cfg.train_tasks, r)
        if note:
            progress(f"round {r}/{self.cfg.rounds} · {note}")
        check_disjoint(tasks, self.eval_tasks)
        write_jsonl(path, (asdict(t) for t in tasks))
        return tasks


def progress(line: str) -> None:
    """A progress line: on the terminal (flows/console.py) and in the flow run's log (the Prefect UI, the log file)."""
    say(line)
    try:
        get_run_logger().info(line)
    except MissingContextError:  # a round run outside a flow (tests, benchmarks)
        logging.getLogger(__name__).info(line)


def _discard_unstarted_runs(cfg: RunConfig, run_id: str) -> None:
    """Delete the MLflow runs of a run id whose saved config is being replaced (RunDir.check_config: no stage ever
    ran with it): they carry the old config's params, which MLflow cannot change, and hold no round's results."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(resolve_uri(cfg.tracking))
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    for old in client.search_runs([exp.experiment_id], f"tags.`{RUN_ID_TAG}` = '{run_id}'") if exp else []:
        client.delete_run(old.info.run_id)


def open_loop(cfg: RunConfig, run: RunDir, logger: logging.Logger) -> Loop:
    """Check the config against the run directory, load the tasks, start vLLM, then open the MLflow runs.

    vLLM starts before anything is recorded: a model or engine that fails to start leaves no MLflow run (RUNNING
    for ever) and no saved config (the run id stays free); whatever fails after the MLflow run exists marks it
    FAILED and stops vLLM."""
    config_dict = cfg.model_dump(mode="json")
    had_config = (run.path / "config.yaml").exists()
    new_run = run.check_config(config_dict, RunConfig)
    model = resolve_model(cfg.model)
    check_model(cfg, model.path)
    eval_tasks = load_tasks(cfg.eval.tasks)
    check_disjoint(load_round_tasks(cfg.train_tasks, 1)[0], eval_tasks)  # each round's are checked when drawn
    if len(eval_tasks) >= 2:  # before vLLM starts: size the evaluation first
        progress(detectable_change_note(len(eval_tasks), cfg.eval.sampling.n, clusters=count_clusters(eval_tasks)))
    t0 = time.perf_counter()
    connected, on_ray = join_cluster(cfg) if cfg.cluster is not None else (False, {})
    try:
        engine = start_engine(cfg, model)
    except BaseException:
        leave_cluster(connected)
        raise
    tracker = None
    try:
        if new_run and had_config:
            _discard_unstarted_runs(cfg, run.run_id)
        tracker = Tracker(cfg.tracking, run.run_id, tags={
            "config_name": cfg.name, "model": cfg.model, "task": cfg.train_tasks.family, GIT_COMMIT_TAG: git_commit()},
            new_loop=new_run)
        run.save_config(config_dict)
        tracker.log_config(config_dict, model.provenance)
        if cfg.cluster is not None:
            from loop.cluster.driver import describe

            tracker.log_params({"cluster_runtime": {**describe(), "replicas": len(engine.replicas)}})
    except BaseException:
        if tracker is not None:
            tracker.finish("FAILED")
        engine.close()
        leave_cluster(connected)
        raise
    progress(f"run {run.run_id}: {run.path}; MLflow {tracker.uri} (experiment {cfg.tracking.experiment}); "
             f"vLLM started in {time.perf_counter() - t0:.0f} s")
    return Loop(cfg, run, model, eval_tasks, tracker, engine, ray_connected=connected, **on_ray)


def join_cluster(cfg: RunConfig) -> tuple[bool, dict[str, Callable]]:
    """Join the Ray cluster as its driver (loop/cluster/driver.py); the Ray grader and trainer for the Loop."""
    from loop.cluster.driver import connect
    from loop.cluster.grading import grade_on_ray
    from loop.cluster.training import train_on_ray

    connected = connect(cfg.cluster)
    return connected, {"grade": functools.partial(grade_on_ray, cluster=cfg.cluster),
                       "trainer": functools.partial(train_on_ray, cluster=cfg.cluster)}


def leave_cluster(connected: bool) -> None:
    if connected:
        from loop.cluster.driver import disconnect

        disconnect()


def start_engine(cfg: RunConfig, model: ResolvedModel, training: bool = True) -> Engine:
    """One VLLMEngine here, or with `cluster:` the pool of replicas on Ray (checked to leave room for grading and,
    when `training`, training beside it)."""
    if cfg.cluster is None:
        progress(f"starting vLLM on {cfg.model} ...")
        return VLLMEngine(model.path, cfg.engine)
    from loop.cluster.driver import check_room
    from loop.cluster.engines import EnginePool

    progress(f"starting {cfg.cluster.engines} vLLM replica(s) of {cfg.model} on Ray ...")
    pool = EnginePool(cfg.model, model.path, cfg.engine, cfg.cluster)
    try:
        check_room(cfg.cluster, training)
    except BaseException:
        pool.close()
        raise
    return pool


def round_params(cfg: RunConfig, r: int, adapter: Path | None) -> dict[str, Any]:
    """The settings round `r` runs with, as params of its nested MLflow run (the compare view lines rounds up by
    them): the policy it starts from, and its sampling and training (round 0 only evaluates)."""
    # The adapter by the round that trained it (its folder's parent), not a path on this machine.
    p: dict[str, Any] = {"model": cfg.model, "adapter": adapter.parent.name if adapter else "base",
                         **{f"eval.{k}": getattr(cfg.eval.sampling, k) for k in ("n", "temperature", "max_tokens")}}
    if r > 0:
        p.update({f"sampling.{k}": getattr(cfg.sampling, k) for k in ("n", "temperature", "max_tokens")})
        p.update({f"train.{k}": getattr(cfg.train, k) for k in ("algorithm", "lr", "beta", "epochs", "lora_r")})
    return p


def run_round(loop: Loop, r: int, adapter: Path | None, adapter_id: int | None,
              timings: dict[str, float] | None = None) -> tuple[dict[str, Any], Path | None, int | None]:
    """Round `r` (round 0: evaluate only) from the current policy `adapter` (None: the base model) served as
    LoRA id `adapter_id`; stages already done in the run directory are skipped (resume).

    Returns the round's metrics and the adapter that is current afterwards, with its LoRA id. `timings`, when
    given, receives the wall time of every stage run (Prefect and file overhead included; "check_adapter" is
    the vLLM check of a newly trained adapter).
    """
    cfg, run, engine = loop.cfg, loop.run, loop.engine
    round_dir = run.round(r)
    metrics_path = round_dir / "metrics.json"
    metrics: dict[str, Any] = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    timings = {} if timings is None else timings
    if not run.done(r, "log"):  # the round's nested MLflow run spans the round (log_round closes it)
        loop.tracker.start_round(r, round_params(cfg, r, adapter))

    def stage(name: str, fn, *args) -> None:
        # Metrics are saved after every stage, so a resumed round keeps the finished stages' figures.
        if not run.done(r, name):
            t0 = time.perf_counter()
            try:
                with PeakMemory() as peak:
                    metrics.update(fn(*args))
            except BaseException as e:
                how = "interrupted" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "failed"
                progress(f"round {r}/{cfg.rounds} · {name} {how} after {time.perf_counter() - t0:.0f} s")
                raise
            metrics.update(peak.metrics(name))
            metrics.update({f"memory/{name}_{k}": v for k, v in engine.memory().items()})
            write_json(metrics_path, metrics)
            run.mark_done(r, name)
            timings[name] = time.perf_counter() - t0
            progress(stage_line(r, cfg.rounds, name, metrics, timings[name]))

    if r > 0:
        tasks = loop.round_tasks(r) if not run.done(r, "verify") else []  # the stages that read them are done
        stage("generate", generate, engine, tasks, cfg, r, adapter, adapter_id, round_dir / "samples.jsonl")
        stage("verify", verify, {t.id: t for t in tasks}, cfg, round_dir / "samples.jsonl", round_dir / "graded.jsonl",
              run.round(r - 1) / "graded.jsonl" if r > 1 else None, loop.grade)
        stage("pairs", pairs, cfg, round_dir / "graded.jsonl", run.round(1) / "graded.jsonl", round_dir / "pairs.jsonl")
        # The current adapter: train_round starts from it (continue_adapter) and/or uses it as the reference.
        # vLLM sleeps while training runs (on CUDA with a sleep mode: its GPU memory goes to the trainer) and wakes
        # for the adapter check; without a sleep mode both do nothing.
        trains = not run.done(r, "train")
        if trains:
            engine.sleep()
        # On Ray the trainer resolves the model on its own node, from the config's name for it.
        stage("train", train, loop.model.path if loop.trainer is None else cfg.model, cfg, round_dir / "pairs.jsonl",
              round_dir / "graded.jsonl", adapter, round_dir / "adapter", loop.trainer)
        if trains:
            engine.wake_up()
        if (round_dir / "adapter").is_dir():
            adapter, adapter_id = round_dir / "adapter", r
            t0 = time.perf_counter()
            check = engine.check_adapter_applied(adapter, adapter_id=adapter_id)
            metrics.update({"adapter_check/shift": check.shift, "adapter_check/error": check.error,
                            "adapter_check/tolerance": check.tolerance})
            timings["check_adapter"] = time.perf_counter() - t0
            progress(f"round {r}/{cfg.rounds} · adapter check in vLLM: error {check.error:.3g} (tolerance "
                     f"{check.tolerance:.3g}) · {timings['check_adapter']:.1f} s")
    if cfg.eval.evaluates(r, cfg.rounds):
        stage("evaluate", evaluate, engine, loop.eval_tasks, cfg, r, adapter, adapter_id, round_dir, loop.grade)
    if not run.done(r, "log"):
        t0 = time.perf_counter()
        metrics["time/stages_s"] = sum(v for k, v in metrics.items() if k.startswith("time/") and k != "time/stages_s")
        # Intervals of every accuracy, and paired changes against round 0 and the last evaluated round before this
        # one (loop/evaluation/stats.py); a round the schedule did not evaluate has none.
        evaluated = [q for q in range(r - 1, -1, -1) if (run.round(q) / PER_PROMPT).exists()]
        metrics.update(round_statistics_from_dirs(round_dir, run.round(0) if r > 0 else None,
                                                  run.round(evaluated[0]) if evaluated else None))
        write_json(metrics_path, metrics)
        if "eval/pass@1_detectable" in metrics:  # round 0 sizes the comparisons to come
            note = detectable_change_from_rates_note(metrics["eval/pass@1_detectable"])
            progress(f"round {r}/{cfg.rounds} · {note}")
        trained = round_dir / "adapter"
        log_round(loop.tracker, r, metrics, round_dir, trained if trained.is_dir() else None,
                  round_line(r, cfg.rounds, metrics))
        # The parent run's description: the round table so far, with intervals and paired changes (MLflow shows a
        # run's note as markdown on its page).
        so_far = [{"round": q, **json.loads((run.round(q) / "metrics.json").read_text())} for q in range(r + 1)
                  if (run.round(q) / "metrics.json").exists()]
        loop.tracker.set_tag("mlflow.note.content", f"{cfg.model} on {cfg.train_tasks.family}, {cfg.rounds} rounds "
                             f"(config {cfg.name}, run {run.run_id})\n\n"
                             + round_markdown(so_far, cfg.eval.primary))
        if (round_dir / PER_PROMPT).exists():
            log_pass_at_k_figure(loop.tracker, cfg.tracking.experiment, run.run_id)
        create_markdown_artifact(key=f"round-{r}", markdown=round_markdown([{"round": r, **metrics}], cfg.eval.primary),
                                 description=f"{run.run_id} round {r}")
        run.mark_done(r, "log")
        timings["log"] = time.perf_counter() - t0
        progress(stage_line(r, cfg.rounds, "log", metrics, timings["log"]))
    run.mark_done(r, "round")
    progress(round_line(r, cfg.rounds, metrics))
    return metrics, adapter, adapter_id


def log_pass_at_k_figure(tracker: Tracker, experiment: str, run_id: str) -> None:
    """pass@k against k for every evaluated round so far, with its 95% bands (the notebook's figure), on the parent
    run as pass_at_k.png, redrawn after each evaluated round. A figure is not worth a round: a failure to draw it
    is a warning on the console, and the loop goes on."""
    import matplotlib

    matplotlib.use("Agg")
    from loop import report

    try:
        data = report.load_loop(tracker.uri, experiment, run_id)
        fig = report.plot_pass_at_k(data)
        with tempfile.TemporaryDirectory() as tmp:
            tracker.log_loop_artifact(report.save_figure(fig, tmp, "pass_at_k", stamp=data.stamp))
    except Exception as e:
        progress(f"warning: the pass@k figure was not drawn ({type(e).__name__}: {e}); the run goes on")


def _run(cfg: RunConfig, run: RunDir, logger: logging.Logger) -> list[dict[str, Any]]:
    loop = open_loop(cfg, run, logger)
    rows: list[dict[str, Any]] = []
    adapter: Path | None = None  # the current policy's adapter (None: the base model)
    adapter_id: int | None = None  # its LoRA id in vLLM: the round that trained it
    try:
        for r in range(0, cfg.rounds + 1):
            metrics, adapter, adapter_id = run_round(loop, r, adapter, adapter_id)
            rows.append({"round": r, **metrics})
        verdict = primary_line(rows, cfg.eval.primary)
        if verdict is not None:
            progress(verdict)
            loop.tracker.set_tag("primary_comparison", verdict)
        loop.tracker.finish()
        create_markdown_artifact(key="loop-summary", markdown=round_markdown(rows, cfg.eval.primary),
                                 description=f"{run.run_id}: all rounds")
    except BaseException:
        loop.tracker.finish("FAILED")
        raise
    finally:
        loop.engine.close()
        leave_cluster(loop.ray_connected)
    return rows
