"""Prompt and target templates: sandboxed Jinja, so a config file cannot run code, with caps on
what one rendering may cost, so it cannot exhaust memory or hang either.

Jinja's sandbox blocks attribute access and caps `range()`, but `{{ 'a' * 10**12 }}` still
allocates a terabyte and nested loops can run for hours. Here `*` and `**` refuse results over
`MAX_CHARS` characters (or digits), a rendering stops past `MAX_CHARS`, and past `MAX_SECONDS`
(an interval timer; in the main thread, where signals are delivered).
"""

from __future__ import annotations

import math
import signal
import threading
from functools import lru_cache

from jinja2 import StrictUndefined, TemplateSyntaxError, meta
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment

from multitune.errors import MultituneError

MAX_CHARS = 1_000_000  # a prompt is a few thousand characters; this is far beyond any real one
MAX_SECONDS = 2.0


class _CappedEnvironment(SandboxedEnvironment):
    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context, operator: str, left, right):
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(times, int) and len(seq) * times > MAX_CHARS:
                    raise SecurityError(f"'*' would make a value of {len(seq) * times:,} items")
            return left * right
        if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            if right * math.log10(abs(left)) > MAX_CHARS:
                raise SecurityError("'**' would make a number of more than a million digits")
        return left**right


_ENV = _CappedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False)


class _TooSlow(Exception):
    pass


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
        with _deadline(MAX_SECONDS):
            parts, size = [], 0
            for part in template.generate(**row):
                size += len(part)
                if size > MAX_CHARS:
                    raise SecurityError(f"it renders to more than {MAX_CHARS:,} characters")
                parts.append(part)
            return "".join(parts)
    except UndefinedError as e:
        raise MultituneError(f"template {source!r}: {e.message}") from None
    except (SecurityError, OverflowError) as e:
        raise MultituneError(f"template {source!r} is not allowed: {e}") from None
    except _TooSlow:
        raise MultituneError(f"template {source!r} is not allowed: it renders for more than {MAX_SECONDS} s") from None
    except (TypeError, ValueError, ArithmeticError, LookupError) as e:
        raise MultituneError(f"template {source!r} fails on this row: {type(e).__name__}: {e}") from None


class _deadline:
    """Raise `_TooSlow` in the rendering thread after `seconds` (main thread only: elsewhere
    the size caps still hold)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.armed = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")

    def __enter__(self) -> None:
        if self.armed:
            self.previous = signal.signal(signal.SIGALRM, self._fire)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc) -> None:
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)

    @staticmethod
    def _fire(signum, frame) -> None:
        raise _TooSlow
