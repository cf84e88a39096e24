"""`pagedserve worker`'s engine flags: one per `EngineConfig` field, derived from the field.

A flag's name (`flag`), type, default and help all come from the dataclass, so a field added
there is a flag here with nothing copied by hand. Typer reads a command's options from its
signature; `engine_options` writes them into it.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import MISSING, Field, fields
from typing import Any, TypeVar

import typer

from pagedserve.engine.config import EngineConfig, flag

Command = TypeVar("Command", bound=Callable[..., Any])


def engine_options(command: Command) -> Command:
    """Give a typer command one option per EngineConfig field but `model` (which the command
    names itself, as --model-path); the command takes them as `**engine`, ready for
    `EngineConfig(model=..., **engine)`."""
    signature = inspect.signature(command)
    own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    if len(own) == len(signature.parameters):
        raise TypeError(f"{command.__name__} must take the engine settings as **kwargs")
    types = typing.get_type_hints(EngineConfig)
    added = [_option(f, types[f.name]) for f in fields(EngineConfig) if f.name != "model"]
    command.__signature__ = signature.replace(parameters=[*own, *added])
    return command


def _option(f: Field, annotation: Any) -> inspect.Parameter:
    default = f.default_factory() if f.default is MISSING else f.default
    name = flag(f.name)
    decls = f"{name}/--no-{name[2:]}" if annotation is bool else name
    option = typer.Option(
        default,
        decls,
        help=f.metadata["help"],
        show_default=f.metadata.get("none_means") or True,
        rich_help_panel="Engine",
    )
    return inspect.Parameter(
        f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation
    )
