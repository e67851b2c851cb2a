"""Prompt and target templates: sandboxed Jinja, so a config file cannot run code."""

from __future__ import annotations

from functools import lru_cache

from jinja2 import StrictUndefined, TemplateSyntaxError, meta
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment

from multitune.errors import MultituneError

_ENV = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False)


@lru_cache(maxsize=256)
def _compile(source: str):
    try:
        return _ENV.from_string(source), frozenset(meta.find_undeclared_variables(_ENV.parse(source)))
    except TemplateSyntaxError as e:
        raise MultituneError(f"template {source!r}: {e.message} (line {e.lineno})") from None


def template_fields(source: str) -> frozenset[str]:
    """The row fields a template reads: checked on every row before training starts."""
    return _compile(source)[1]


def render(source: str, row: dict) -> str:
    template, _ = _compile(source)
    try:
        return template.render(**row)
    except UndefinedError as e:
        raise MultituneError(f"template {source!r}: {e.message}") from None
    except SecurityError as e:
        raise MultituneError(f"template {source!r} is not allowed: {e}") from None
