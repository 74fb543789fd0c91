"""The /v1/chat/completions request body as pydantic models: types, ranges and shapes checked in
one place, each failure an OpenAI-shaped error naming the parameter (`ApiError`).

Strict: a string is not a number and a number is not a bool (OpenAI answers "hot" for temperature
with a 400, not a coercion). Fields OpenAI defines that the server does not use (user, metadata,
store, ...) are accepted and ignored; null means unset. What depends on several fields or on the
server (the model's name, tool_choice naming a listed tool, a schema the grammar
engine can hold) serve.parse_chat checks.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

TOP_LOGPROBS = 20   # OpenAI's limit; the engine computes this many whenever a row asks


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class _Function(_Body):
    name: str
    arguments: str | dict


class _ToolCall(_Body):
    function: _Function


class Message(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list | None = None
    tool_calls: list[_ToolCall] | None = None


class _ToolFunction(_Body):
    name: str
    parameters: dict | None = None


class Tool(_Body):
    function: _ToolFunction


class _Name(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: _Name


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict | None = None


class _StreamOptions(_Body):
    include_usage: bool | None = None


class _TemplateKwargs(_Body):
    enable_thinking: bool | None = None


class ChatRequest(_Body):
    model: str
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    n: int | None = Field(None, ge=1, le=64)
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    chat_template_kwargs: _TemplateKwargs | None = None


_MODELS = (ChatRequest, Message, _ToolCall, _Function, Tool, _ToolFunction, NamedToolChoice, _Name,
           ResponseFormat, _StreamOptions, _TemplateKwargs)
_FIELDS = {name for m in _MODELS for name in m.model_fields}


def _param(loc: tuple) -> str:
    """('messages', 0, 'role') -> 'messages[0].role'; pydantic's union-member tags are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _FIELDS:
            out += f".{part}" if out else part
    return out


def parse(body: Any) -> ChatRequest:
    """The request, or the ApiError of its first problem (400, the parameter, a code:
    missing_required_parameter, invalid_type or invalid_value)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return ChatRequest.model_validate(body)
    except pydantic.ValidationError as e:
        errors = e.errors(include_url=False)
        # A union (stop: a string or a list) reports one error per member: the field's value is
        # of a wrong type when every member says so, else the member that took it says what.
        field = [x for x in errors if x["loc"][:1] == errors[0]["loc"][:1]]
        values = [x for x in field if not _is_type_error(x)]
        first = values[0] if values else field[0]
        param = _param(first["loc"])
        if first["type"] == "missing":
            code, what = "missing_required_parameter", "is required"
        else:
            code = "invalid_value" if values else "invalid_type"
            what = "; or ".join(dict.fromkeys(x["msg"] for x in (values[:1] or field)))
            what = f"{what} (got {first['input']!r:.80})"
        raise ApiError(400, f"'{param}': {what}", param, code) from None


def _is_type_error(error: dict) -> bool:
    return error["type"].endswith("_type") or (error["type"] == "literal_error"
                                               and not isinstance(error["input"], str))
