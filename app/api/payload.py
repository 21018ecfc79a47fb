"""Decode a request body (multipart form or JSON) into image bytes, text and extra fields.

Both encodings are parsed by hand (with Starlette's multipart parser) rather than by FastAPI
parameters so that one endpoint can accept either, with one set of limits and error messages.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from app.core.errors import (
    BadRequestError,
    InvalidFieldError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)


@dataclass
class Payload:
    image: bytes | None = None
    text: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)


def decode_base64(value: str, field_name: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidFieldError(f"{field_name} is not valid base64", field=field_name) from None


def check_text(text: str | None, max_chars: int, field_name: str = "text", required: bool = True) -> str | None:
    if text is None:
        if required:
            raise InvalidFieldError(f"{field_name} is required", field=field_name)
        return None
    if len(text) > max_chars:
        raise PayloadTooLargeError(f"{field_name} has {len(text)} characters, over the limit of {max_chars} "
                                   "(MMFUSION_MAX_TEXT_CHARS)", field=field_name)
    if not text.strip():
        raise InvalidFieldError(f"{field_name} must not be empty or whitespace only", field=field_name)
    return text


async def read_payload(request: Request, json_model: type[BaseModel], *, max_part_bytes: int) -> Payload:
    """Multipart: ``image`` file + form fields. JSON: ``json_model`` with ``image_base64``."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=2, max_fields=16, max_part_size=max_part_bytes)
        except MultiPartException as exc:
            raise BadRequestError(f"malformed multipart body: {exc.message}") from None
        out = Payload()
        for key in set(form.keys()):
            values = form.getlist(key)
            if len(values) > 1:
                raise InvalidFieldError(f"field {key!r} was sent {len(values)} times; send it once", field=key)
            value = values[0]
            if key == "image":
                if not isinstance(value, UploadFile):
                    raise InvalidFieldError("image must be a file part (multipart filename=...)", field="image")
                out.image = await value.read()
            elif isinstance(value, UploadFile):
                raise InvalidFieldError(f"field {key!r} must be a plain form field, not a file", field=key)
            elif key == "text":
                out.text = value
            else:
                out.fields[key] = value
        return out
    if ctype == "application/json":
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequestError(f"body is not valid JSON: {exc}") from None
        try:
            model = json_model.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"]) or None
            raise InvalidFieldError(f"{loc or 'body'}: {err['msg']}", field=loc) from None
        values = model.model_dump()
        image_b64 = values.pop("image_base64", None)
        text = values.pop("text", None)
        return Payload(
            image=decode_base64(image_b64, "image_base64") if image_b64 is not None else None,
            text=text,
            fields=values,
        )
    raise UnsupportedMediaTypeError(
        f"Content-Type {ctype or '(none)'} is not supported; send multipart/form-data or application/json"
    )
