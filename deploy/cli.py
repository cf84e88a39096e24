"""The `pagedserve` command line: one typer app, each command a thin call into its module."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

app = typer.Typer(help="pagedserve: serve many LLMs at once on a paged-KV engine.", no_args_is_help=True)
models_app = typer.Typer(help="Fetch and list ready-made models.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@app.callback()
def _setup(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command("make-model")
def make_model(
    arch: str = typer.Option("llama", help="Architecture to build."),
    preset: str = typer.Option("tiny", help="Size preset: tiny or small."),
    out: Path = typer.Option(..., help="Folder to write the model into."),
    seed: int = typer.Option(0, help="Seed for the random weights."),
) -> None:
    """Build a random-weight model with `transformers`, plus an offline tokenizer."""
    from pagedserve.deploy.make_model import build_model

    try:
        path = build_model(arch=arch, preset=preset, out=out, seed=seed)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    typer.echo(f"wrote {path}")


@app.command()
def demo() -> None:
    """Run the main job: the built-in demo model through the engine."""
    from pagedserve.deploy.demo import run_demo

    run_demo()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
