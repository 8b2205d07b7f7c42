"""A stage's Config dataclass as its command line: each setting declares its default, choices and help once.

    @dataclass(frozen=True, kw_only=True)
    class Config:
        views: int = setting(1, help="Views per image (view 0 = the teacher's own view).")

    @main.command()
    @config_options(Config)
    def cache_teacher(**given): ...        # build the Config with `make_config(Config, given)`

Every field becomes `--field-name` (a bool a flag, an optional bool an `--x/--no-x` pair, a tuple of
numbers a comma-separated list, `choices` a fixed list; `argument=True` a positional argument), and
its help ends in the Config's default. An option left out arrives as None and is dropped, so a recipe's
value and then the Config's default apply: the CLI never retypes a default.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path

import click

from dho_pipeline.errors import UserError


def setting(default=dataclasses.MISSING, *, help: str, choices: tuple | None = None, default_text: str | None = None,
            cli: bool = True, argument: bool = False, type: click.ParamType | None = None):
    """A Config field with its command-line face: help line, fixed choices, how to show a computed default
    (`default_text`), whether it is a positional `argument`, a custom click `type`; `cli=False` keeps a
    field off the command line (settable in a recipe only)."""
    metadata = {"help": help, "choices": choices, "default_text": default_text, "cli": cli, "argument": argument,
                "type": type}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class FloatList(click.ParamType):
    """`1,2` -> (1.0, 2.0)."""

    name = "X,Y,..."

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return tuple(float(part) for part in value.split(",") if part.strip())
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers", param, ctx)


class IntOrAll(click.ParamType):
    """A positive count, or `all` (None: no limit)."""

    name = "N|all"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int) or value == "all":
            return value
        try:
            return int(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number nor 'all'", param, ctx)


def _unwrap_optional(annotation):
    """(the type inside Optional[...], whether None is allowed)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return (inner[0] if len(inner) == 1 else str), len(inner) < len(typing.get_args(annotation))
    return annotation, False


def _format_default(value) -> str | None:
    if value is None or value is dataclasses.MISSING:
        return None
    if isinstance(value, bool):
        return None  # a flag's default (off) needs no mention
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    if isinstance(value, Path):
        return value.name
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def default_shown(field: dataclasses.Field) -> str | None:
    """What a field's help quotes as its default."""
    return field.metadata.get("default_text") or _format_default(field.default)


def _click_parameter(field: dataclasses.Field, annotation):
    """A click.Option (or Argument) for one Config field."""
    kind, optional = _unwrap_optional(annotation)
    meta = field.metadata
    flag = "--" + field.name.replace("_", "-")
    origin = typing.get_origin(kind)
    element = typing.get_args(kind)[0] if origin is tuple else kind  # a tuple's items, or the type itself
    param_type = meta.get("type")
    if param_type is None:
        if meta.get("choices"):
            param_type = click.Choice(list(meta["choices"]))
        elif element is Path:
            param_type = click.Path(path_type=Path)
        elif origin is tuple and element is float:
            param_type = FloatList()
        elif element in (int, float, str):
            param_type = element
    if meta.get("argument"):
        return click.Argument([field.name], type=param_type, nargs=-1 if origin is tuple else 1,
                              required=field.default is dataclasses.MISSING)
    help_text = meta["help"]
    shown = default_shown(field)
    if shown is not None:
        help_text = f"{help_text} [default: {shown}]"
    elif field.default is dataclasses.MISSING:
        help_text = f"{help_text} [required]"
    if kind is bool:
        if optional:  # on, off, or the Config's own choice
            return click.Option([f"{flag}/--no-{flag[2:]}", field.name], default=None, help=help_text)
        return click.Option([flag, field.name], is_flag=True, default=None, help=help_text)
    if origin is tuple and element is str:  # repeatable, e.g. --data A --data B
        return click.Option([flag, field.name], multiple=True, type=param_type, help=help_text)
    return click.Option([flag, field.name], type=param_type, default=None, help=help_text)


def config_options(config_class, *, exclude: tuple[str, ...] = ()):
    """A decorator adding a click parameter for every command-line field of `config_class`."""
    hints = typing.get_type_hints(config_class)

    def decorate(command):
        for field in reversed(dataclasses.fields(config_class)):
            if field.name in exclude or not field.metadata.get("cli", True) or "help" not in field.metadata:
                continue
            parameter = _click_parameter(field, hints[field.name])
            command.__click_params__ = getattr(command, "__click_params__", [])
            command.__click_params__.append(parameter)
        return command

    return decorate


def given(options: dict) -> dict:
    """The options the user actually gave (None, and an empty repeatable, mean "not given")."""
    return {name: value for name, value in options.items() if value is not None and value != ()}


def make_config(config_class, settings: dict, where: str = "as options"):
    """The Config from the given settings; a missing required setting is a one-line error naming its flag."""
    absent = [f.name for f in dataclasses.fields(config_class)
              if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in settings]
    if absent:
        raise UserError(f"missing {', '.join('--' + name.replace('_', '-') for name in absent)}; give them {where}")
    return config_class(**settings)


def check_choices(config) -> None:
    """Every field declared with `choices` holds one of them (or None where that is its default): a
    recipe or a Python caller passes values that click never saw."""
    for field in dataclasses.fields(config):
        allowed, value = field.metadata.get("choices"), getattr(config, field.name)
        if allowed and value not in allowed and not (value is None and field.default is None):
            raise UserError(f"--{field.name.replace('_', '-')} must be one of {', '.join(map(str, allowed))}, "
                            f"not {value!r}")


_VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def _expand_variables(value: str, path: Path, name: str) -> str:
    """`${SHOTS}` and `${SEED:-1}` in a recipe's string value, from the environment (or the default)."""

    def one(match: re.Match) -> str:
        variable, default = match.group(1), match.group(2)
        if variable in os.environ:
            return os.environ[variable]
        if default is not None:
            return default
        raise UserError(f"recipe {path}: {name} uses ${{{variable}}}; set it, e.g. "
                        f"{variable}=... dho-pipeline train --config {path.stem}")

    return _VARIABLE.sub(one, value)


def read_recipe(path: Path, config_class, shipped: Path) -> dict:
    """Settings of `config_class` from a TOML recipe (a `[train]` table, or top-level keys; `about` is a
    description), found at `path` or, by name, among the recipes that ship in `shipped`. Paths are
    relative to the working directory; lists become tuples where the Config wants tuples. A string value
    may use environment variables, `${SHOTS}` or `${SEED:-1}` (with a default), also for numbers
    (`epochs = "${EPOCHS}"`); an unset variable without a default is refused."""
    import tomllib

    path = Path(path)
    if not path.exists() and (shipped / f"{path.name}.toml").is_file():
        path = shipped / f"{path.name}.toml"
    try:
        recipe = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        names = ", ".join(sorted(p.stem for p in shipped.glob("*.toml")))
        raise UserError(f"recipe {path} does not exist (recipes that ship with dho-pipeline: {names})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"recipe {path} is not valid TOML ({error})") from None
    recipe = recipe.get("train", recipe)
    recipe.pop("about", None)
    hints = typing.get_type_hints(config_class)
    unknown = sorted(set(recipe) - set(hints))
    if unknown:
        raise UserError(f"recipe {path}: unknown setting(s) {', '.join(unknown)}")
    for name, value in recipe.items():
        kind, _ = _unwrap_optional(hints[name])
        if isinstance(value, str) and "${" in value:
            value = recipe[name] = _expand_variables(value, path, name)
            if kind in (int, float):  # a number given through a variable
                try:
                    value = recipe[name] = kind(value)
                except ValueError:
                    raise UserError(f"recipe {path}: {name} = {value!r} is not a number") from None
        if kind is Path and isinstance(value, str):
            recipe[name] = Path(value)
        elif typing.get_origin(kind) is tuple and isinstance(value, list):
            numbers = typing.get_args(kind)[0] is float
            recipe[name] = tuple(float(v) if numbers else v for v in value)
    return recipe
