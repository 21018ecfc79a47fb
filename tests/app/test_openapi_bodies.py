"""The request bodies /docs shows are the ones the hand-written parser accepts."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from app.api.payload import multipart_fields
from app.api.schemas import ClassifyJSONRequest, EmbedJSONRequest, IndexItemJSONRequest, SearchJSONRequest


@pytest.mark.parametrize(("path", "model"), [
    ("/v1/classify", ClassifyJSONRequest),
    ("/v1/embed", EmbedJSONRequest),
    ("/v1/search", SearchJSONRequest),
    ("/v1/index/items", IndexItemJSONRequest),
])
def test_form_and_json_bodies_document_exactly_the_fields_the_parser_takes(client, path: str,
                                                                           model: type[BaseModel]) -> None:
    op = client.get("/openapi.json").json()["paths"][path]["post"]
    content = op["requestBody"]["content"]
    form = content["multipart/form-data"]["schema"]
    assert set(form["properties"]) == multipart_fields(model)
    assert form["properties"]["image"]["format"] == "binary"
    assert set(form.get("required", [])) <= set(form["properties"])
    json_schema = content["application/json"]["schema"]
    assert set(json_schema["properties"]) == set(model.model_fields)
    assert "$ref" not in str(content)  # /docs cannot resolve $defs inside a hand-written requestBody
    assert {"413", "415", "422"} <= set(op["responses"])


def test_the_openapi_schema_is_built_at_start_up_not_under_the_first_request(client) -> None:
    assert client.app.openapi_schema is not None  # no request has been made yet
    assert "/v1/classify" in client.app.openapi_schema["paths"]
