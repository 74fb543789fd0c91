"""Structured outputs (constrain.py) through the server and the real `openai` client: every reply
to a response_format or a forced tool_choice parses and validates (jsonschema is the reference),
over many seeds at temperature 1 from a model with random weights, which left alone writes no
JSON at all; rows without a constraint sample what they would alone."""
import concurrent.futures
import json

import jsonschema
import numpy as np
import openai
import pytest

from tarl_jax import constrain, serve
from tarl_jax.judge import llm

NAME = "micro-test"   # conftest.micro_server

CHAT = [{"role": "user", "content": "Return my order as JSON."}]
SCHEMAS = {
    "order": {"type": "object", "additionalProperties": False,
              "required": ["order_id", "status", "items", "paid"],
              "properties": {"order_id": {"type": "string", "pattern": "^#W[0-9]{4}$"},
                             "status": {"enum": ["pending", "delivered", "cancelled"]},
                             "items": {"type": "array", "maxItems": 3,
                                       "items": {"type": "integer", "minimum": 0, "maximum": 99}},
                             "paid": {"type": "boolean"}}},
    "nested": {"type": "object", "additionalProperties": False, "required": ["user"],
               "properties": {"user": {
                   "type": "object", "additionalProperties": False, "required": ["name", "zip"],
                   "properties": {"name": {"type": "string", "maxLength": 12},
                                  "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}},
    "judge verdict (3 turns)": llm.verdict_schema(3, max_reason_chars=40),
}
TOOLS = [{"type": "function", "function": {
             "name": "get_order_details", "parameters": {
                 "type": "object", "additionalProperties": False, "required": ["order_id"],
                 "properties": {"order_id": {"type": "string", "pattern": "^#W[0-9]{7}$"}}}}},
         {"type": "function", "function": {
             "name": "cancel_pending_order", "parameters": {
                 "type": "object", "additionalProperties": False, "required": ["order_id", "reason"],
                 "properties": {"order_id": {"type": "string", "pattern": "^#W[0-9]{7}$"},
                                "reason": {"enum": ["no longer needed", "ordered by mistake"]}}}}}]
SEEDS = range(12)


def ask(srv, **kw):
    c = openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0, timeout=300)
    return c.chat.completions.create(**{"model": NAME, "messages": CHAT, "temperature": 1.0,
                                        "max_tokens": 300, **kw})


def many(srv, bodies):
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda kw: ask(srv, **kw), bodies))


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_reply_to_a_json_schema_parses_and_validates(micro_server, name):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMAS[name], "strict": True}}
    replies = many(micro_server, [dict(response_format=fmt, seed=s) for s in SEEDS])
    texts = set()
    for r in replies:
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])
        texts.add(choice.message.content)
    assert len(texts) > len(SEEDS) // 2   # sampled, not one forced string


def test_json_object_replies_are_objects_and_free_text_is_not_json(micro_server):
    replies = many(micro_server, [dict(response_format={"type": "json_object"}, seed=s, max_tokens=64)
                            for s in SEEDS])
    objects = [r for r in replies if r.choices[0].finish_reason == "stop"]
    assert len(objects) >= len(SEEDS) // 2       # an unbounded object may run past 64 tokens
    for r in objects:
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    free = many(micro_server, [dict(seed=s, max_tokens=64) for s in SEEDS])
    assert not any(_is_json(r.choices[0].message.content or "") for r in free)


def _is_json(text):
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def _calls(reply):
    return [(c.function.name, json.loads(c.function.arguments))
            for c in reply.choices[0].message.tool_calls or ()]


def test_required_and_named_tool_choice_force_valid_calls(micro_server):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for reply in many(micro_server, [dict(tools=TOOLS, tool_choice="required", seed=s) for s in SEEDS]):
        assert reply.choices[0].finish_reason == "tool_calls" and _calls(reply)
        assert reply.choices[0].message.content is None
        for name, args in _calls(reply):
            jsonschema.validate(args, schemas[name])
    named = {"type": "function", "function": {"name": "cancel_pending_order"}}
    for reply in many(micro_server, [dict(tools=TOOLS, tool_choice=named, parallel_tool_calls=False,
                                    seed=s) for s in SEEDS]):
        [(name, args)] = _calls(reply)
        assert name == "cancel_pending_order"
        jsonschema.validate(args, schemas[name])


def test_tool_choice_none_never_writes_a_call(micro_server, tok):
    for reply in many(micro_server, [dict(tools=TOOLS, tool_choice="none", seed=s, max_tokens=64)
                               for s in SEEDS]):
        assert not reply.choices[0].message.tool_calls
    # the ban is the call token's bit alone
    row = serve.constrain.Grammars(tok, 2048).ban_calls()
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")
    assert np.flatnonzero(bits == 0).tolist() == [tok._tok.token_to_id("<tool_call>")]


def test_a_row_samples_the_same_tokens_beside_grammar_rows_as_alone(micro_server):
    alone = [ask(micro_server, seed=s, max_tokens=40).choices[0].message.content for s in range(4)]
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMAS["order"]}}
    mixed = many(micro_server, [dict(seed=s, max_tokens=40) for s in range(4)] +
                 [dict(response_format=fmt, seed=s) for s in range(4)])
    assert [r.choices[0].message.content for r in mixed[:4]] == alone


def test_constraints_that_cannot_hold_are_400s(micro_server):
    c = openai.OpenAI(base_url=micro_server.url, api_key="x", max_retries=0)
    unclosed = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(unclosed"}}}
    bad_tool = [{"type": "function", "function": {"name": "f", "parameters": unclosed}}]
    bad = [(dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
            "tool_choice"),
           (dict(tool_choice="required"), "tool_choice"),
           (dict(tools=TOOLS, tool_choice="always"), "tool_choice"),
           (dict(response_format={"type": "json_schema", "json_schema": {"name": "x",
                                                                         "schema": unclosed}}),
            "response_format"),
           (dict(tools=bad_tool, tool_choice="required"), "tools"),
           (dict(response_format={"type": "json_schema"}), "response_format")]
    for kw, param in bad:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=NAME, messages=CHAT, max_tokens=4, **kw)
        assert e.value.body["param"] == param, (kw, e.value.body)
    assert ask(micro_server, max_tokens=4).choices[0].finish_reason == "length"   # still serving


def test_the_grammar_mask_allows_exactly_what_the_matcher_accepts(tok):
    g = constrain.Grammars(tok, 2048)
    m = g.matcher(g.grammar({"type": "json_schema", "json_schema": {"schema": SCHEMAS["nested"]}},
                            "auto", None))
    masks = constrain.allow_all(1, 2048)
    constrain.fill(m, masks, 0)
    allowed = np.flatnonzero(np.unpackbits(masks[0].view(np.uint8), bitorder="little"))
    # the first token of the style-fixed JSON: '{' (or tokens that spell a longer valid start)
    assert len(allowed) and all(tok.decode([int(i)]).startswith("{") for i in allowed)
    assert not any(m.deep_copy().consume_token(i) for i in (tok.stop_ids[0],))
