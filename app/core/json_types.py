"""JSON type names for error messages: clients send JSON, so a refusal names JSON's types.

Python's names (``NoneType``, ``list``, ``str``) leak the implementation and mean nothing to a client
written in another language; ``null``, ``array`` and ``string`` are what the client actually sent.
"""

from __future__ import annotations


def json_type_name(value: object) -> str:
    """The JSON type of a value parsed from JSON (``object``, ``array``, ``string``, ``number``,
    ``boolean``, ``null``); anything else (never parsed from JSON) by its Python name."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
