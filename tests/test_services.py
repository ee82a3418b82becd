"""End to end against real services: a Prefect server, an MLflow tracking server, and `ratchet serve`.

The loop is served as a Prefect deployment by the project's CLI, triggered through the Prefect API,
and its results are read back from the MLflow server over HTTP (REST and the proxied artifact store).
Nothing is mocked; every service is a subprocess in its own process group, and the teardown checks
that none of them leaves a process behind.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from mlflow.artifacts import download_artifacts
from mlflow.tracking import MlflowClient

from helpers import tiny_config

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
NAME = "svc"  # config name = deployment name = run id
MARKER = "RATCHET_TEST_SERVICES"  # every process this test starts (and their children) inherits it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(log: Path, n: int = 6000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else "(no log)"


def _procs() -> list[tuple[int, int, str, bytes]]:
    """(pid, process group, state, environ) of every live process we may read."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            env = (d / "environ").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        out.append((int(d.name), int(fields[2]), fields[0], env))
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "(gone)"


class Services:
    """Starts subprocesses in their own sessions (process group id = pid), logs each to a file."""

    def __init__(self, root: Path):
        self.root = root
        self.token = uuid.uuid4().hex
        self.procs: dict[str, tuple[subprocess.Popen, Path]] = {}

    def start(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, cwd=cwd, env={**env, MARKER: self.token, "PYTHONUNBUFFERED": "1"},
                                    stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.procs[name] = (proc, log)
        return proc

    def log(self, name: str) -> str:
        return f"--- {name} log (tail) ---\n{tail(self.procs[name][1])}"

    def wait_http(self, name: str, url: str, timeout: float) -> None:
        proc, _ = self.procs[name]
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode} before answering {url}\n{self.log(name)}")
            if time.monotonic() > deadline:
                pytest.fail(f"{name} did not answer {url} within {timeout:.0f}s\n{self.log(name)}")
            time.sleep(0.5)

    def members(self) -> list[int]:
        """Live (non-zombie) processes in our process groups or carrying our marker."""
        groups = {p.pid for p, _ in self.procs.values()}
        mark = f"{MARKER}={self.token}".encode()
        return [pid for pid, pgid, state, env in _procs()
                if state != "Z" and (pgid in groups or mark in env.split(b"\0"))]

    def stop(self, name: str, sig: int, grace: float) -> None:
        """Send `sig` to the process group; SIGKILL the group if anything in it outlives `grace`."""
        proc, _ = self.procs[name]
        for s, wait in ((sig, grace), (signal.SIGKILL, 15)):
            try:
                os.killpg(proc.pid, s)
            except ProcessLookupError:  # the group is empty
                break
            if self._group_gone(proc, wait):
                break
            print(f"{name}: process group still alive {wait:.0f}s after {signal.Signals(s).name}")
        proc.wait(timeout=5)

    @staticmethod
    def _group_gone(proc: subprocess.Popen, wait: float) -> bool:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None and not any(g == proc.pid and st != "Z" for _, g, st, _ in _procs()):
                return True
            time.sleep(0.2)
        return False


@pytest.fixture
def services(tmp_path: Path):
    svc = Services(tmp_path)
    yield svc
    # Serving first (it talks to both servers), then the servers.
    if "serve" in svc.procs:
        svc.stop("serve", signal.SIGINT, grace=30)
    for name in ("prefect", "mlflow"):
        if name in svc.procs:
            svc.stop(name, signal.SIGTERM, grace=30)
    deadline = time.monotonic() + 10
    while (left := svc.members()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, "processes left behind: " + "; ".join(f"{pid}: {cmdline(pid)}" for pid in left)


def wait_final(client, flow_run_id, timeout: float, services: Services):
    deadline = time.monotonic() + timeout
    serve = services.procs["serve"][0]
    while True:
        run = client.read_flow_run(flow_run_id)
        if run.state is not None and run.state.is_final():
            return run
        if serve.poll() is not None:
            pytest.fail(f"ratchet serve exited with {serve.returncode}\n{services.log('serve')}")
        if time.monotonic() > deadline:
            pytest.fail(f"flow run {run.name} still {run.state_name} after {timeout:.0f}s\n{services.log('serve')}")
        time.sleep(2)


def test_served_deployment_on_prefect_and_mlflow_servers(tmp_path: Path, services: Services):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    prefect_port, mlflow_port = free_port(), free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    mlflow_uri = f"http://127.0.0.1:{mlflow_port}"
    artifacts = tmp_path / "mlartifacts"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    base["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    base["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

    services.start("prefect", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", str(prefect_port)],
                   {**base, "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path}/prefect.db"},
                   cwd=tmp_path)
    # The job runner (MLflow's GenAI background jobs) is not used by the loop: off, to spare the CPUs.
    services.start("mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
                              "--artifacts-destination", str(artifacts), "--host", "127.0.0.1",
                              "--port", str(mlflow_port), "--workers", "1"],
                   {**base, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, cwd=tmp_path)
    services.wait_http("prefect", f"{api}/health", timeout=180)
    services.wait_http("mlflow", f"{mlflow_uri}/health", timeout=180)

    # No tracking.uri in the config: the flow must use $MLFLOW_TRACKING_URI, i.e. the server.
    cfg = tiny_config(tmp_path, name=NAME, rounds=3, tracking={"uri": None, "experiment": "services"})
    env = {**base, "PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": mlflow_uri}
    serve = services.start("serve", [sys.executable, "-m", "flows.cli", "serve", "--config", str(cfg),
                                     "--rounds", "1", "--name", NAME], env, cwd=tmp_path)
    run_dir = tmp_path / "runs" / NAME

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        deadline = time.monotonic() + 240
        while True:
            try:
                deployment = client.read_deployment_by_name(f"self-improve/{NAME}")
                break
            except ObjectNotFound:
                pass
            assert serve.poll() is None, f"ratchet serve exited with {serve.returncode}\n{services.log('serve')}"
            assert time.monotonic() < deadline, f"no deployment self-improve/{NAME}\n{services.log('serve')}"
            time.sleep(1)
        assert deployment.parameters == {"config_path": str(cfg.resolve()), "more_rounds": 1, "run_id": None}

        first = run_deployment(f"self-improve/{NAME}", timeout=0, as_subflow=False)

        # A second trigger while the first run holds the run directory: it must skip, not interfere.
        deadline = time.monotonic() + 300
        while not (run_dir / ".lock").exists():
            fr = client.read_flow_run(first.id)
            assert not fr.state.is_final(), f"first run ended before locking: {fr.state!r}\n{services.log('serve')}"
            assert time.monotonic() < deadline, f"first run never started\n{services.log('serve')}"
            time.sleep(1)
        trigger = subprocess.run([str(BIN / "prefect"), "deployment", "run", f"self-improve/{NAME}"], env=env,
                                 cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert trigger.returncode == 0, trigger.stdout + trigger.stderr
        second_id = uuid.UUID(re.search(r"UUID: ([0-9a-f-]{36})", trigger.stdout).group(1))

        second = wait_final(client, second_id, timeout=300, services=services)
        assert second.state.is_completed(), f"{second.state!r}\n{services.log('serve')}"
        assert not client.read_flow_run(first.id).state.is_final(), "the second run did not overlap the first"
        skip = f"skipping: run '{NAME}' is in use by another process"
        deadline = time.monotonic() + 60  # the run's logs reach the API in batches, after its final state
        while True:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[second_id])))
            if any(skip in log.message for log in logs):
                break
            assert time.monotonic() < deadline, f"no skip line in the second run's logs: {[l.message for l in logs]}"
            time.sleep(1)

        done = wait_final(client, first.id, timeout=900, services=services)
        assert done.state.is_completed(), (f"flow run {done.name} ended {done.state.name}: {done.state.message}\n"
                                           f"{services.log('serve')}")
        assert (run_dir / "round-01" / "round.done").exists() and not (run_dir / "round-02").exists()

        # The next trigger goes on with one more round of the same loop (from round 1's adapter), as a nightly
        # schedule would: before, it found the config's rounds all done and did nothing (after starting vLLM).
        third = run_deployment(f"self-improve/{NAME}", timeout=0, as_subflow=False)
        done = wait_final(client, third.id, timeout=900, services=services)
        assert done.state.is_completed(), f"{done.state!r}\n{services.log('serve')}"
        assert (run_dir / "round-02" / "round.done").exists()

    # Results, read back from the MLflow server over HTTP.
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("services")
    assert exp is not None and exp.artifact_location.startswith("mlflow-artifacts:"), exp
    runs = client.search_runs([exp.experiment_id], f"tags.`ratchet.run_id` = '{NAME}'")
    parents = [r for r in runs if r.data.tags.get("kind") == "loop"]
    assert len(parents) == 1, [r.data.tags for r in runs]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    tags = parent.data.tags
    assert tags["config_name"] == NAME and tags["model"] == "smollm2-135m-instruct" and tags["task"] == "arithmetic"
    assert tags["git_commit"], tags
    rounds = {int(r.data.tags["round"]): r for r in runs if r.data.tags.get("kind") == "round"}
    assert sorted(rounds) == [0, 1, 2]
    for r, run in rounds.items():
        rid = run.info.run_id
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED"
        assert {"eval/pass_at_1", "eval/pass_at_2", "eval/greedy_acc"} <= set(run.data.metrics), run.data.metrics
        listed = {a.path for a in client.list_artifacts(rid)}
        expected = {"eval_samples.jsonl", "eval_per_prompt.jsonl", "metrics.json"}
        expected |= {"samples.jsonl", "pairs.jsonl"} if r else set()
        adapter = run_dir / f"round-{r:02d}" / "adapter"
        expected |= {"adapter"} if adapter.is_dir() else set()
        assert expected <= listed, f"round {r}: {sorted(listed)}"
        # Proxied artifact storage: the files went through the server into its --artifacts-destination.
        local = run_dir / f"round-{r:02d}" / "metrics.json"
        got = Path(download_artifacts(run_id=rid, artifact_path="metrics.json", dst_path=str(tmp_path / f"dl{r}"),
                                      tracking_uri=mlflow_uri))
        assert json.loads(got.read_text()) == json.loads(local.read_text())
        assert (artifacts / exp.experiment_id / rid / "artifacts" / "metrics.json").is_file()
        if adapter.is_dir():
            versions = client.search_model_versions(f"name = 'ratchet-{NAME}' and run_id = '{rid}'")
            assert len(versions) == 1, versions
    history = client.get_metric_history(parent.info.run_id, "eval/pass_at_1")
    assert sorted(m.step for m in history) == [0, 1, 2]  # one point a round


@pytest.mark.parametrize("user_setting", [None, "7"])
def test_flows_give_prefects_temporary_server_time_to_start(user_setting):
    """Importing flows/ (as `ratchet` and the flow do) raises the temporary server's start timeout from
    Prefect's 20 s, which a busy 2-core CI machine overran, and turns telemetry off; a user's own setting
    wins. Read from Prefect's settings in a fresh process, as Prefect reads them once at import."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    if user_setting is not None:
        env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = user_setting
    code = ("import flows.self_improve\n"
            "from prefect.settings import get_current_settings as s\n"
            "print(s().server.ephemeral.startup_timeout_seconds, s().server.analytics_enabled)")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [user_setting or "120", "False"]
