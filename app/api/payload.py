"""Decode a request body (multipart form or JSON) into image bytes, text and extra fields.

Both encodings are parsed here rather than by FastAPI parameters so that one endpoint can accept
either, with one set of limits and error messages. Structure errors (a body that is not valid
multipart or JSON) are 400; a well-formed body with a bad or missing field is 422 naming the
field; a body or part over a limit is 413; an unsupported Content-Type is 415.

Multipart is parsed with ``python_multipart`` directly (the parser Starlette uses) instead of
``Request.form()``, because Starlette's form parser silently decodes invalid UTF-8 as Latin-1
(mojibake reaches the model), reports every limit as a generic 400, and lets a body end without
its closing boundary. Here:

* at most :data:`MAX_PARTS` parts; a name not in the endpoint's schema is 422 at its header, a
  name sent twice is 422 at the second header, so thousands of parts stop at the first bad one;
* form fields are at most :data:`MAX_FIELD_BYTES` and are decoded as strict UTF-8 (or the part's
  declared ``charset``); files are at most ``max_part_bytes`` (and the whole body is bounded by
  ``BodyLimitMiddleware`` while it streams);
* a body that ends before the closing boundary is 400.

JSON is parsed with :func:`parse_json`: duplicate keys, ``NaN``/``Infinity``, numbers that overflow
and strings holding lone surrogates (which cannot be encoded as UTF-8 in the response) are refused.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.core.errors import (
    BadRequestError,
    InvalidFieldError,
    MMFusionError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from app.core.json_types import json_type_name
from app.preprocessing.text import clean_text, has_lone_surrogate

MAX_PARTS = 16
MAX_FIELD_BYTES = 1024 * 1024
# Longest integer literal accepted in JSON. Python refuses to parse > 4300 digits with a ValueError;
# nothing in this API needs more than a few digits.
MAX_INT_DIGITS = 100
IMAGE_FIELD = "image"
M = TypeVar("M", bound=BaseModel)


@dataclass
class Payload:
    image: bytes | None = None
    text: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    image_field: str = "image"
    """What the client called the image (``image`` part, or JSON ``image_base64``): errors name it."""


def content_type(request: Request) -> tuple[str, dict[bytes, bytes]]:
    """The lower-cased media type and its parameters (``boundary``, ``charset``).

    Refuses (415) what every body route would otherwise misread: a compressed body
    (``Content-Encoding``; it would fail as "not valid UTF-8" or "malformed multipart"), and JSON
    declared in a charset other than UTF-8 (JSON is UTF-8, RFC 8259; decoding it as UTF-8 anyway would
    silently change non-ASCII text)."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaTypeError(f"Content-Encoding {encoding} is not supported; send the body uncompressed")
    raw = request.headers.get("content-type", "")
    ctype, params = parse_options_header(raw)
    media = ctype.decode("latin-1").strip().lower()
    charset = params.get(b"charset", b"utf-8").decode("latin-1").strip().lower()
    if media == "application/json" and charset not in ("utf-8", "utf8", "us-ascii", "ascii"):  # ASCII is UTF-8
        raise UnsupportedMediaTypeError(f"JSON in charset {charset} is not supported; send UTF-8 (RFC 8259)")
    return media, params


def decode_base64(value: str, field_name: str) -> bytes:
    """Standard base64; line breaks/spaces and a ``data:<type>;base64,`` prefix are tolerated."""
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        pass
    cleaned = value
    if cleaned.startswith("data:") and ";base64," in cleaned[:256]:
        cleaned = cleaned.split(",", 1)[1]
    cleaned = "".join(cleaned.split())
    try:
        return base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidFieldError(f"{field_name} is not valid base64", field=field_name) from None


def check_text(text: str | None, max_chars: int, field_name: str = "text", required: bool = True) -> str | None:
    """A client's text, validated and cleaned (control characters stripped, see ``app.preprocessing.text``).

    Missing and required, empty after cleaning, or holding a lone surrogate: 422. Longer than
    ``max_chars`` characters: 413.
    """
    if text is None:
        if required:
            raise InvalidFieldError(f"{field_name} is required", field=field_name)
        return None
    if not isinstance(text, str):
        raise InvalidFieldError(f"{field_name} must be a string", field=field_name)
    if len(text) > max_chars:
        raise PayloadTooLargeError(f"{field_name} has {len(text)} characters, over the limit of {max_chars} "
                                   "(MMFUSION_MAX_TEXT_CHARS)", field=field_name)
    if has_lone_surrogate(text):
        raise InvalidFieldError(f"{field_name} is not valid Unicode (it holds a lone surrogate code point)",
                                field=field_name)
    cleaned = clean_text(text)
    if not _visible(cleaned):
        raise InvalidFieldError(f"{field_name} must not be empty, or only whitespace, control or invisible "
                                "format characters", field=field_name)
    return cleaned


def _visible(text: str) -> bool:
    """True if ``text`` has a character that is neither whitespace nor an invisible format character
    (``Cf``: zero-width space, BOM, direction marks). Format characters are kept inside real text
    (``app.preprocessing.text``), but a text made only of them carries nothing to encode."""
    return any(not ch.isspace() and (ch.isascii() or unicodedata.category(ch) != "Cf") for ch in text)


# --------------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------------


class _Refused:
    """Stands in for a JSON value we refuse, so the error can name the field that held it."""

    __slots__ = ("why",)

    def __init__(self, why: str):
        self.why = why


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        self.key = key


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


_FORM_INT = re.compile(r"-?[0-9]{1,18}")


def integer_field(raw: object, field: str) -> int:
    """An integer from a JSON body (already an int: strict validation) or a form field (its text).

    Form text must be plain ASCII digits, like a JSON number: ``int()`` alone also took " 5", "1_0"
    and "٥" (Arabic-Indic five), which the JSON body refuses."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and _FORM_INT.fullmatch(raw):
        return int(raw)
    raise InvalidFieldError(f"{field} must be an integer", field=field)


def _parse_float(text: str) -> float | _Refused:
    value = float(text)
    return value if math.isfinite(value) else _Refused(f"the number {text[:32]} is out of range")


def _parse_int(text: str) -> int | _Refused:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        return _Refused(f"an integer of {len(text)} digits is too large")
    return int(text)


def _parse_constant(text: str) -> _Refused:
    return _Refused(f"{text} is not a valid JSON number")


def _path(parts: tuple[str | int, ...]) -> str | None:
    return ".".join(str(p) for p in parts) or None


def _check_values(data: Any) -> None:
    """Refuse marked numbers and strings that cannot be encoded as UTF-8, naming where they are.

    Iterative (an explicit stack): the document may be nested as deep as the parser allowed.
    """
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(data, ())]
    while stack:
        value, where = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if has_lone_surrogate(key):
                    raise InvalidFieldError("a key is not valid Unicode (lone surrogate)", field=_path(where))
                stack.append((item, (*where, key)))
        elif isinstance(value, list):
            stack.extend((item, (*where, i)) for i, item in enumerate(value))
        elif isinstance(value, _Refused):
            name = _path(where)
            raise InvalidFieldError(f"{name or 'body'}: {value.why}", field=name)
        elif isinstance(value, str) and has_lone_surrogate(value):
            name = _path(where)
            raise InvalidFieldError(f"{name or 'body'} is not valid Unicode (it holds a lone surrogate code point)",
                                    field=name)


def parse_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity, finite numbers, no lone surrogates.

    Malformed JSON (or not UTF-8, or nested too deeply) is 400; a well-formed document with a
    refused value is 422 naming the field.
    """
    if not raw.strip():
        raise BadRequestError("body is empty; send a JSON object")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadRequestError(f"body is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text, object_pairs_hook=_pairs, parse_float=_parse_float, parse_int=_parse_int,
                          parse_constant=_parse_constant)
    except json.JSONDecodeError as exc:
        raise BadRequestError(f"body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except _DuplicateKey as exc:
        raise InvalidFieldError(f"field {exc.key!r} appears more than once in the JSON object; send it once",
                                field=exc.key) from None
    except RecursionError:
        raise BadRequestError("body is not valid JSON: nested too deeply") from None
    _check_values(data)
    return data


def parse_json_field(raw: str, field_name: str) -> Any:
    """JSON carried in a form field (``filter``, ``metadata`` in multipart), as strict as :func:`parse_json`.

    Every refusal is a 422 naming the field (``metadata`` or ``metadata.<key>``), since the body itself
    was well-formed.
    """
    try:
        return parse_json(raw.encode("utf-8", "surrogatepass"))
    except MMFusionError as exc:
        where = f"{field_name}.{exc.field}" if exc.field else field_name
        message = exc.message.removeprefix("body is not valid JSON: ").removeprefix("body is ")
        raise InvalidFieldError(f"{field_name} is not valid JSON: {message}", field=where) from None


async def read_json_body(request: Request) -> Any:
    """The request's JSON document (415 unless the Content-Type is ``application/json``)."""
    ctype, _ = content_type(request)
    if ctype != "application/json":
        raise UnsupportedMediaTypeError(f"Content-Type {ctype or '(none)'} is not supported; send application/json")
    return parse_json(await request.body())


def validate_model(model: type[M], data: Any) -> M:
    """``data`` against ``model``; the 422 names the first offending field (``items.0.text``).

    Strict: JSON already has types, so ``"top_k": "3"`` or ``"top_k": true`` is a client bug to
    report, not a value to coerce (pydantic's lax mode would read ``true`` as 1)."""
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = _path(tuple(err["loc"]))
        raise InvalidFieldError(f"{loc or 'body'}: {validation_message(err)}", field=loc) from None


def validation_message(err: Mapping[str, Any]) -> str:
    """A pydantic error's message without the "Value error, " that pydantic puts before a validator's own."""
    return str(err.get("msg", "invalid value")).removeprefix("Value error, ")


# --------------------------------------------------------------------------------------------------
# multipart/form-data
# --------------------------------------------------------------------------------------------------


@dataclass
class _Part:
    name: str = ""
    filename: bytes | None = None
    charset: str = "utf-8"
    data: bytearray = field(default_factory=bytearray)


class _MultipartReader:
    """python_multipart callbacks enforcing our limits as each header and chunk arrives."""

    def __init__(self, allowed: frozenset[str] | None, max_file_bytes: int):
        self.allowed = allowed
        self.max_file_bytes = max_file_bytes
        self.parts: dict[str, _Part] = {}
        self.count = 0
        self.finished = False
        self._part = _Part()
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self.on_part_begin, "on_part_data": self.on_part_data,
            "on_header_field": self.on_header_field, "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end, "on_headers_finished": self.on_headers_finished,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self.count += 1
        if self.count > MAX_PARTS:
            raise PayloadTooLargeError(f"multipart body has more than {MAX_PARTS} parts")
        self._part = _Part()
        self._headers = {}

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[bytes(self._header_name).strip().lower()] = bytes(self._header_value).strip()
        self._header_name.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if disposition != b"form-data" or b"name" not in options:
            raise BadRequestError('every multipart part needs "Content-Disposition: form-data; name=..."')
        try:
            name = options[b"name"].decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequestError("a multipart field name is not valid UTF-8") from None
        if self.allowed is not None and name not in self.allowed:
            raise InvalidFieldError(f"unknown field {name!r}; this endpoint takes {sorted(self.allowed)}", field=name)
        if name in self.parts:
            raise InvalidFieldError(f"field {name!r} was sent more than once; send it once", field=name)
        self._part.name = name
        self._part.filename = options.get(b"filename")
        _, ct_params = parse_options_header(self._headers.get(b"content-type", b""))
        if b"charset" in ct_params:
            charset = ct_params[b"charset"].decode("latin-1")
            try:
                self._part.charset = codecs.lookup(charset).name
            except LookupError:
                raise UnsupportedMediaTypeError(f"field {name!r} declares unknown charset {charset!r}; send UTF-8",
                                                field=name) from None
        self.parts[name] = self._part

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        limit = self.max_file_bytes if part.filename is not None else MAX_FIELD_BYTES
        if len(part.data) + (end - start) > limit:
            kind = "file" if part.filename is not None else "form field"
            raise PayloadTooLargeError(f"{kind} {part.name!r} is over the limit of {limit} bytes", field=part.name)
        part.data += data[start:end]

    def on_end(self) -> None:
        self.finished = True


async def _read_multipart(request: Request, params: dict[bytes, bytes], allowed: frozenset[str] | None,
                          max_file_bytes: int) -> dict[str, _Part]:
    boundary = params.get(b"boundary", b"")
    if not boundary or len(boundary) > 200:
        raise BadRequestError("multipart/form-data needs a boundary parameter (1-70 characters) in Content-Type")
    reader = _MultipartReader(allowed, max_file_bytes)
    parser = MultipartParser(boundary, reader.callbacks())
    try:
        async for chunk in request.stream():
            if chunk:
                parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise BadRequestError(f"malformed multipart body: {exc}") from None
    if not reader.finished:
        raise BadRequestError("malformed multipart body: it ends before the closing boundary")
    return reader.parts


def multipart_fields(json_model: type[BaseModel]) -> frozenset[str]:
    """Form field names an endpoint takes: its JSON model's fields, with ``image`` for ``image_base64``."""
    names = set(json_model.model_fields)
    if "image_base64" in names:
        names.discard("image_base64")
        names.add(IMAGE_FIELD)
    return frozenset(names)


async def read_payload(request: Request, json_model: type[BaseModel], *, max_part_bytes: int) -> Payload:
    """Multipart: an ``image`` file part + form fields. JSON: ``json_model`` with ``image_base64``.

    ``max_part_bytes`` bounds the image file part; the multipart field names accepted are
    :func:`multipart_fields` of ``json_model``.
    """
    ctype, params = content_type(request)
    if ctype == "multipart/form-data":
        parts = await _read_multipart(request, params, multipart_fields(json_model), max_part_bytes)
        out = Payload()
        for name, part in parts.items():
            if name == IMAGE_FIELD:
                if part.filename is None:
                    raise InvalidFieldError("image must be a file part (multipart filename=...)", field=IMAGE_FIELD)
                out.image = bytes(part.data)
                continue
            if part.filename is not None:
                raise InvalidFieldError(f"field {name!r} must be a plain form field, not a file", field=name)
            try:
                value = part.data.decode(part.charset)
            except UnicodeDecodeError as exc:
                raise InvalidFieldError(f"field {name!r} is not valid {part.charset} (byte {exc.start})",
                                        field=name) from None
            if name == "text":
                out.text = value
            else:
                out.fields[name] = value
        return out
    if ctype == "application/json":
        data = parse_json(await request.body())
        if not isinstance(data, dict):
            raise InvalidFieldError(f"body must be a JSON object, not {json_type_name(data)}", field=None)
        values = validate_model(json_model, data).model_dump()
        image_b64 = values.pop("image_base64", None)
        text = values.pop("text", None)
        return Payload(
            image=decode_base64(image_b64, "image_base64") if image_b64 is not None else None,
            text=text,
            fields=values,
            image_field="image_base64",
        )
    hint = " (images cannot be sent url-encoded)" if ctype == "application/x-www-form-urlencoded" else ""
    raise UnsupportedMediaTypeError(
        f"Content-Type {ctype or '(none)'} is not supported{hint}; send multipart/form-data or application/json"
    )
