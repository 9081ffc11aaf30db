"""The one exception type users see: a one-line message naming the problem."""
from __future__ import annotations


class CfbError(Exception):
    """An error with a message fit for the user (no traceback is shown for it); ``field``: the
    argument it is about, where one is (the HTTP API names it beside the message)."""

    def __init__(self, message: str = "", *, field: str | None = None):
        super().__init__(message)
        self.field = field


class UnknownIdError(CfbError):
    """A user, item or model version that nothing stored is (``field``: "user", "item" or "version"); HTTP
    answers 404."""


class NotReadyError(CfbError):
    """Nothing to answer from yet: a database with no cfb data, or no trained model; HTTP answers 503."""


class BusyError(CfbError):
    """A write that waited out the busy timeout behind another writer, or found every connection in use:
    try again shortly (HTTP answers 503 with Retry-After)."""


class CannotAnswerError(CfbError):
    """A valid request that the serving version cannot answer (an item it does not hold yet, the biases
    of an nn version); HTTP answers 409."""


def printable(text: str) -> str:
    """``text`` with each character that would not print (a line break, a NUL) escaped, as ``repr``
    writes it: a name from the input (a JSON key, a column) stays on the message's one line."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def cut(text, keep: int = 40, head: int | None = None) -> str:  # noqa: ANN001
    """``text`` (made a ``str``: a key given from Python may be a number) for a one-line message: over
    ``keep`` characters, its first ``head`` (half of ``keep`` unless given) and "..."."""
    text = str(text)
    return text if len(text) <= keep else text[:keep // 2 if head is None else head] + "..."


def json_shown(value) -> str:  # noqa: ANN001
    """A value read from JSON, for a message, as JSON writes it where Python's spelling differs (true,
    null, [1, 2], {"a": 1}); a text or a number as ``repr`` writes it; a long one cut short."""
    if value is None or isinstance(value, (bool, list, dict)):
        import json

        return cut(json.dumps(value, ensure_ascii=False, default=str), 60, 57)
    if isinstance(value, str):
        return repr(cut(value))
    token = getattr(value, "token", None)  # (a NaN or Infinity token as the file wrote it)
    return cut(token if isinstance(token, str) else repr(value), 60, 57)


class InputError(CfbError):
    """Bad input: names the file (or entry), the line and the field (``field`` whole; the message cuts
    a long one short, ``FIELD_SHOWN``)."""

    FIELD_SHOWN = 48  # characters of a field's name the message shows (an answer's or rating's key may be long)

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None,
                 field: str | None = None):
        where = ", ".join(p for p in (
            None if source is None else printable(source), f"line {line}" if line is not None else None,
            f"field '{cut(printable(field), self.FIELD_SHOWN, self.FIELD_SHOWN - 8)}'" if field else None) if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.source, self.line, self.field, self.problem = source, line, field, message


class UserExistsError(InputError):
    """A sign-up under a user id that is taken; HTTP answers 409."""


def argument_error(message: str, field: str | None = None) -> InputError:
    """Bad input in an argument (a call's, a request's): an ``InputError`` whose ``field`` names it for
    the HTTP API, not written into ``message`` (which names it in its own words)."""
    error = InputError(message)
    error.field = field
    return error


def check_whole(value, name: str, lo: int, hi: int | None = None) -> int:  # noqa: ANN001
    """``value`` as an int if it is a whole number (numpy's too; not a bool) from ``lo`` to ``hi``,
    else a one-line ``InputError`` naming ``name`` (the API's arguments, checked as the CLI's options)."""
    import numbers

    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= lo \
        and (hi is None or value <= hi)
    if not ok:
        raise InputError(f"{name} must be a whole number from {lo}" + ("" if hi is None else f" to {hi}")
                         + f", got {value!r}")
    return int(value)
