"""Build an argparse CLI from a pydantic-settings class: one `--flag-name` per field, its description as help.

Values given on the command line override the environment (`PREFIX_FIELD_NAME`), which overrides the defaults.
Each flag's help shows the field's default (a factory's value, an enum's value); Literal and Enum fields list
their `choices`, and argparse refuses anything else.
"""

from __future__ import annotations

import argparse
import enum
import logging
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

S = TypeVar("S", bound=BaseSettings)


def build_parser(cls: type[BaseSettings], prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for name, field in cls.model_fields.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=argparse.SUPPRESS, help=_help(field),
                            **_value_options(field.annotation))
    return parser


def parse_settings(cls: type[S], prog: str, description: str, argv: Sequence[str] | None = None) -> S:
    given = vars(build_parser(cls, prog, description).parse_args(argv))
    return cls(**given)


def _help(field: FieldInfo) -> str:
    description = field.description or ""
    if "(default:" not in description:  # unless the description already says what the default means
        default = field.get_default(call_default_factory=True, validated_data={})
        description += f" (default: {default.value if isinstance(default, enum.Enum) else default!r})"
    return description.replace("%%", "%").replace("%", "%%")  # argparse formats help with %: a plain % or a %%


def _value_options(annotation: Any) -> dict[str, Any]:
    """argparse options (nargs, action, type, choices) for a field's type; `X | None` is read as X."""
    kinds = [a for a in typing.get_args(annotation) if a is not type(None)] if _is_union(annotation) else [annotation]
    if len(kinds) != 1:
        numbers = [k for k in (float, int) if k in kinds]  # e.g. int | float: parse the wider one
        return {"type": numbers[0]} if numbers else {}
    kind = kinds[0]
    if typing.get_origin(kind) is list:
        item = typing.get_args(kind)
        return {"nargs": "*", **(_value_options(item[0]) if item else {})}
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(kind) is typing.Literal:
        return _choices(list(typing.get_args(kind)))
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return _choices([member.value for member in kind])
    if kind in (int, float):
        return {"type": kind}
    return {}


def _choices(values: list[Any]) -> dict[str, Any]:
    kinds = {type(v) for v in values}
    return {"choices": values, **({"type": kinds.pop()} if len(kinds) == 1 else {})}


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("hivemind", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
