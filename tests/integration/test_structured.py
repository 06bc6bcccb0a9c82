"""Structured outputs through the real stack: `response_format` decoded by the tiers' vLLM
engines (xgrammar or guidance), on the plain tier and on the speculating one, through the
official `openai` client, the handle API and an agent framework (langchain-openai); schemas
decoding cannot follow are 400s naming the field; an answer whose personal data the output
guard redacts stays valid against its schema, or its choice ends `content_filter`."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from .conftest import TIER

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
SPECULATING = "quality"


class Capital(BaseModel):
    city: str = Field(max_length=24)
    country: str = Field(max_length=24)


def schema_format(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


ANSWER = {
    "type": "object",
    "properties": {"answer": {"type": "string", "maxLength": 24}, "sure": {"type": "boolean"}},
    "required": ["answer", "sure"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("tier", [TIER, SPECULATING])
def test_the_openai_clients_parse_gets_an_instance_of_the_model(client, tier):
    completion = client.chat.completions.parse(
        model=tier, messages=QUESTION, response_format=Capital, max_tokens=64, temperature=0
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop" and completion.model == tier
    assert isinstance(choice.message.parsed, Capital) and choice.message.parsed.city


@pytest.mark.parametrize("tier", [TIER, SPECULATING])
def test_a_streamed_json_schema_answer_is_valid_against_the_schema(client, tier):
    stream = client.chat.completions.create(
        model=tier,
        messages=QUESTION,
        response_format=schema_format(ANSWER),
        max_tokens=64,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    jsonschema.validate(json.loads(text), ANSWER)


def test_json_object_and_completions(client):
    chat = client.chat.completions.create(
        model=TIER,
        messages=[
            {"role": "user", "content": "Reply with a JSON object whose only key is answer, with the value yes."}
        ],
        response_format={"type": "json_object"},
        max_tokens=48,
        temperature=0,
    )
    content = chat.choices[0].message.content
    assert chat.choices[0].finish_reason == "stop" and isinstance(json.loads(content), dict), content
    # vLLM's extension, kept: response_format on text completions.
    completion = client.completions.create(
        model=TIER,
        prompt="The capital of France, as JSON:",
        max_tokens=48,
        temperature=0,
        extra_body={"response_format": schema_format(ANSWER)},
    )
    assert completion.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(completion.choices[0].text), ANSWER)


def test_structured_output_through_the_handle_api(ingress_handle):
    body = {"model": TIER, "messages": QUESTION, "max_tokens": 64, "temperature": 0}
    result = ingress_handle.chat.remote({**body, "response_format": schema_format(ANSWER)}).result()
    jsonschema.validate(json.loads(result.choices[0].message.content), ANSWER)


@pytest.mark.parametrize(
    "schema, text",
    [
        ({"type": "object", "properties": {"a": {"type": "strin"}}}, "not a valid JSON Schema at properties/a/type"),
        ({"type": "string", "not": {"const": "Paris"}}, "'not'"),  # decoding would ignore it
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),  # vLLM refuses it
        ({"type": "integer", "minimum": 5, "maximum": 3}, "Unsatisfiable"),  # vLLM refuses it
        ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems"),  # vLLM refuses it
    ],
)
def test_schemas_decoding_cannot_follow_are_400s_naming_the_field(client, http, schema, text):
    def failed() -> int:
        (small,) = [t for t in http.get("/v1/tiers").json()["data"] if t["name"] == TIER]
        return small["stats"]["failed"]

    before = failed()
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=TIER, messages=QUESTION, response_format=schema_format(schema), max_tokens=8
        )
    error = err.value.body
    assert err.value.status_code == 400 and error["param"].startswith("response_format"), error
    assert text in error["message"]
    assert failed() == before  # a request the engine refused is the caller's error, not the tier's failure


# Decoding writes an e-mail address the guard then redacts: inside a string, where the schema
# takes any string, the answer stays valid; where a pattern wants an address, the redacted
# answer is not valid any more and its choice ends `content_filter` (the client's `parse`
# raises for it rather than handing back an instance the schema does not describe).
FREE = {
    "type": "object",
    "properties": {
        "contact": {"type": "string", "pattern": "^mail [a-z]{3,12}@example[.]com now$|^mail <[A-Z_]+> now$"}
    },
    "required": ["contact"],
    "additionalProperties": False,
}
CHECKED = {
    "type": "object",
    "properties": {"contact": {"type": "string", "pattern": "^[a-z]{3,12}@example[.]com$"}},
    "required": ["contact"],
    "additionalProperties": False,
}
WHO = [{"role": "user", "content": "Whom should I write to about my order? Answer in JSON."}]


def test_personal_data_in_a_json_answer_is_redacted_inside_its_strings(client):
    completion = client.chat.completions.create(
        model=TIER, messages=WHO, response_format=schema_format(FREE), max_tokens=48, temperature=0
    )
    choice = completion.choices[0]
    contact = json.loads(choice.message.content)["contact"]
    assert choice.finish_reason == "stop" and contact == "mail <EMAIL_ADDRESS> now", contact
    assert completion.tierserve["safety"]["output"] == {"EMAIL_ADDRESS": 1}


def test_a_redaction_that_breaks_the_schema_ends_the_answer_filtered(client):
    class Contact(BaseModel):
        contact: str = Field(pattern="^[a-z]{3,12}@example[.]com$")

    completion = client.chat.completions.create(
        model=TIER, messages=WHO, response_format=schema_format(CHECKED), max_tokens=48, temperature=0
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "content_filter" and "@example.com" not in choice.message.content
    safety = completion.tierserve["safety"]
    assert safety["output"] == {"EMAIL_ADDRESS": 1} and "not valid against the schema" in safety["output_blocked"]
    with pytest.raises(openai.ContentFilterFinishReasonError):
        client.chat.completions.parse(model=TIER, messages=WHO, response_format=Contact, max_tokens=48, temperature=0)


def test_langchain_with_structured_output(app):
    """An agent framework users run against OpenAI-compatible servers, unchanged."""
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=TIER, base_url=app.openai_base, api_key="unused", temperature=0, max_tokens=64, max_retries=0
    )
    capital = llm.with_structured_output(Capital, method="json_schema").invoke(QUESTION[0]["content"])
    assert isinstance(capital, Capital) and capital.city
