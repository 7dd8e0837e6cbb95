"""The `robovlms` command line."""

from __future__ import annotations

import typer

app = typer.Typer(help="robovlms: build, train, sweep and compare vision-language-action robot policies.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Episode stores: generate demonstrations, import datasets, inspect.", no_args_is_help=True)
app.add_typer(data_app, name="data")


if __name__ == "__main__":
    app()
