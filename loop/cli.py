"""The `ratchet` command line."""
import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Iterative on-policy self-improvement loop.")


@app.command()
def version() -> None:
    """Print the installed version."""
    from importlib.metadata import version as v

    typer.echo(v("ratchet-loop"))
