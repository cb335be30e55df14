"""Build an argparse CLI from a pydantic-settings class: one `--flag-name` per field, its description as help.

Values given on the command line override the environment (`PREFIX_FIELD_NAME`), which overrides the defaults.
"""

from __future__ import annotations

import argparse
import logging
import typing
from collections.abc import Sequence
from typing import TypeVar

from pydantic_settings import BaseSettings

S = TypeVar("S", bound=BaseSettings)


def parse_settings(cls: type[S], prog: str, description: str, argv: Sequence[str] | None = None) -> S:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for name, field in cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        args = typing.get_args(field.annotation)
        kwargs: dict = {"dest": name, "default": argparse.SUPPRESS, "help": f"{field.description} (default: "
                        f"{field.default!r})"}
        if typing.get_origin(field.annotation) is list:
            kwargs["nargs"] = "*"
        elif field.annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif field.annotation in (int, float):
            kwargs["type"] = field.annotation
        elif int in args or float in args:
            kwargs["type"] = int if int in args else float
        parser.add_argument(flag, **kwargs)
    given = vars(parser.parse_args(argv))
    return cls(**given)


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("hivemind", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
