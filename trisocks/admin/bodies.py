"""Reading request bodies, in one place: every route that takes a body calls :func:`json_body`.

Decoding is strict, so that any malformed input is a 4xx with the error shape rather than an
exception deep in a route (issue 12, section 4):

* a ``Content-Type`` other than JSON is a 415 (a missing one is read as JSON: some clients
  leave it out); a body over ``MAX_CONTENT_LENGTH`` is a 413 (raised by Quart);
* the bytes must be UTF-8 (strict) and one JSON value, nested at most :data:`MAX_DEPTH` deep
  (checked before parsing: Python's parser raises ``RecursionError`` on deep nesting);
* ``NaN``/``Infinity`` literals, numbers that overflow a float, integers longer than
  :data:`MAX_DIGITS`, duplicate keys and strings holding lone surrogates (``"\\ud800"``) are
  rejected;
* the value must be an object whose keys are among the route's fields.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection
from typing import Any, NoReturn

from quart import request
from werkzeug.exceptions import BadRequest, UnsupportedMediaType

__all__ = ["MAX_DEPTH", "MAX_DIGITS", "json_body", "parse_json"]

MAX_DEPTH = 32
"""The deepest nesting of arrays and objects a body may have; the API's bodies are flat."""

MAX_DIGITS = 40
"""The longest integer literal accepted; every limit fits in 19 digits."""

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


def _reject(message: str) -> NoReturn:
    raise BadRequest(f"the request body is not valid JSON: {message}")


def _check_depth(text: str) -> None:
    depth = 0
    for match in _BRACKET.finditer(_STRING.sub('""', text)):
        depth += 1 if match[0] in "[{" else -1
        if depth > MAX_DEPTH:
            _reject(f"nested more than {MAX_DEPTH} deep")


class _Rejected:
    """Stands for a number the parser met and refused, until :func:`_check` can say where."""

    def __init__(self, message: str) -> None:
        self.message = message


def _constant(name: str) -> _Rejected:
    return _Rejected(f"{name} is not a JSON number")


def _float(text: str) -> float | _Rejected:
    value = float(text)
    return value if math.isfinite(value) else _Rejected(f"{text} is out of range")


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        _reject(f"an integer of {len(text)} digits is out of range")
    return int(text)


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        keys = [key for key, _ in pairs]
        _reject(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return result


def _check(value: Any, where: str = "") -> None:
    """Reject refused numbers and strings (or keys) holding lone surrogates, which cannot be
    encoded again, naming where they are (``limits.quota_day``, ``[2]``)."""
    problem = None
    if isinstance(value, _Rejected):
        problem = value.message
    elif isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            problem = "a string holds a lone surrogate (\\ud800-\\udfff)"
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check(item, f"{where}[{index}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check(key, where)
            _check(item, f"{where}.{key}" if where else key)
    if problem:
        _reject(f"{where[:64]}: {problem}" if where else problem)


def parse_json(data: bytes) -> Any:
    """*data* as one JSON value, decoded strictly (module docstring).

    Raises:
        BadRequest: anything malformed, with a message saying what.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        _reject(f"not UTF-8 (byte {exc.start})")
    _check_depth(text)
    try:
        value = json.loads(text, parse_constant=_constant, parse_float=_float,
                           parse_int=_int, object_pairs_hook=_object)
    except RecursionError:  # not reached after _check_depth; kept as a backstop
        _reject("nested too deep")
    except ValueError as exc:  # JSONDecodeError, and int/float conversions
        _reject(str(exc))
    _check(value)
    return value


def _json_type(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    names = {list: "an array", str: "a string", int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def _check_content_type() -> None:
    mimetype = request.mimetype
    if mimetype and not (mimetype == "application/json" or mimetype.endswith("+json")):
        raise UnsupportedMediaType(f"the request body must be application/json, not {mimetype}")
    charset = request.mimetype_params.get("charset", "utf-8").lower()
    if charset not in ("utf-8", "utf8"):
        raise UnsupportedMediaType(f"the request body must be UTF-8, not {charset}")


async def json_body(fields: Collection[str]) -> dict[str, Any]:
    """The request body as a JSON object with keys among *fields* (in the order given, for
    the message); 400, 413 or 415 otherwise. Routes check the values' types."""
    _check_content_type()
    data = await request.get_data(cache=True, as_text=False, parse_form_data=False)  # or 413
    body = parse_json(data)
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {_json_type(body)}")
    unknown = [key for key in body if key not in fields]
    if unknown:
        raise BadRequest(f"{unknown[0][:64]}: unknown field (known: {', '.join(fields)})")
    return body
