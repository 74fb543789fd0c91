"""Structured outputs: replies held to a request's `response_format` and `tool_choice`, token by
token, with llguidance (the grammar engine behind vLLM's and SGLang's guided decoding).

A request's constraint is a grammar: a JSON schema, or a Lark grammar of Qwen tool calls
(`<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`, each function's parameters a
JSON schema). Per row an `LLMatcher` follows the reply and fills the row's bitmask of allowed
next tokens (a bit per vocabulary id in int32 words, the sampler's `allow`); the end-of-turn
tokens are allowed exactly when the grammar is complete, so a reply that stops is whole. JSON is
written in the style of the chat template's own tool calls (", " and ": ", no other whitespace):
what the model was trained on, and it leaves a weak model no run of blanks to wander into.

tool_choice "none" needs no grammar: a fixed mask bans the `<tool_call>` token.
"""
from __future__ import annotations

import json
from typing import Any

import llguidance
import llguidance.numpy as llnp
import numpy as np

from tarl_jax.models import tokenizer as tokenizer_lib

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ConstraintError(ValueError):
    """The request's response_format / tool_choice cannot be enforced (the message says why;
    `param`: the request field at fault, what an OpenAI-style 400 names)."""

    def __init__(self, message: str, param: str = "response_format"):
        super().__init__(message)
        self.param = param


def allow_all(rows: int, vocab_size: int) -> np.ndarray:
    return llnp.allocate_token_bitmask(rows, vocab_size)


def _schema(schema: Any, where: str, param: str = "response_format") -> dict:
    if schema is True or schema is None:
        schema = {}
    if not isinstance(schema, dict):
        raise ConstraintError(f"{where} must be a JSON schema object", param)
    return {**schema, "x-guidance": JSON_STYLE}


class Grammars:
    """Grammars and matchers for one tokenizer and model vocabulary (the LLTokenizer is built
    once, on first use: ~1 s for Qwen3's 151k tokens)."""

    def __init__(self, tok: tokenizer_lib.ChatTokenizer, vocab_size: int):
        self.tok, self.vocab_size = tok, vocab_size
        self._lltok = None
        # Qwen's tokenizers (and ours) spell each call marker as one token; others spell it in
        # pieces, and the grammar then asks for the text.
        self.call_ids = tuple(tok._tok.token_to_id(t) for t in
                              (tokenizer_lib.TOOL_CALL, tokenizer_lib.TOOL_CALL_END))

    @property
    def lltok(self) -> llguidance.LLTokenizer:
        if self._lltok is None:
            self._lltok = llguidance.LLTokenizer(self.tok._tok.to_str(), n_vocab=self.vocab_size,
                                                 eos_token=list(self.tok.stop_ids))
        return self._lltok

    def grammar(self, response_format: dict | None, tool_choice: Any, tools: list | None,
                parallel: bool = True) -> str | None:
        """The grammar a reply must match (None: free text). response_format: OpenAI's
        {"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": ...}};
        tool_choice: "auto" | "required" | {"type": "function", "function": {"name": ...}}
        ("none" is `ban_calls`'s); parallel: more than one call allowed."""
        kind = (response_format or {}).get("type") or "text"
        content = None
        if kind == "json_object":
            content = {"type": "object"}
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec and "name" not in spec:
                raise ConstraintError("response_format.json_schema must be an object with "
                                      "'name' and 'schema'")
            content = spec.get("schema") or {}
        named = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) \
            else None
        forced = tool_choice == "required" or named is not None
        if not forced and (content is None or tools is None or tool_choice == "none"):
            return None if content is None else \
                llguidance.LLMatcher.grammar_from_json_schema(_schema(content, "the schema"))
        fns = [t["function"] for t in tools or ()]
        if named is not None:
            fns = [f for f in fns if f["name"] == named]
            if not fns:
                raise ConstraintError(f"tool_choice names {named!r}, which is not in 'tools'",
                                      "tool_choice")
        if not fns:
            raise ConstraintError("tool_choice 'required' needs 'tools'", "tool_choice")
        start, tc_end = (json.dumps(text) if i is None else f"<[{i}]>" for i, text in
                         zip(self.call_ids, (tokenizer_lib.TOOL_CALL, tokenizer_lib.TOOL_CALL_END)))
        lines = ['calls: call' + (' ("\\n" call)*' if parallel else ""),
                 f'call: {start} "\\n" (' + " | ".join(f"fn{k}" for k in range(len(fns)))
                 + f') "\\n" {tc_end}']
        for k, fn in enumerate(fns):
            body = {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                    "properties": {"name": {"const": fn["name"]},
                                   "arguments": fn.get("parameters") or {"type": "object"}}}
            lines.append(f"fn{k}: %json " + json.dumps(_schema(body, f"tool {fn['name']!r}", "tools")))
        if forced:
            lines.insert(0, "start: calls")
        else:   # auto, with tools and a response format: the content's JSON or calls
            lines.insert(0, "start: answer | calls")
            lines.append("answer: %json " + json.dumps(_schema(content, "the schema")))
        return llguidance.LLMatcher.grammar_from_lark("\n".join(lines))

    def matcher(self, grammar: str, param: str = "response_format") -> llguidance.LLMatcher:
        """param: the field blamed if the grammar does not compile (llguidance's message
        does not say which of its schemas failed)."""
        m = llguidance.LLMatcher(self.lltok, grammar, log_level=0)
        if m.is_error():
            raise ConstraintError(f"the schema cannot be enforced: {m.get_error()}", param)
        return m

    def ban_calls(self) -> np.ndarray:
        """One row's mask without the `<tool_call>` token (tool_choice "none")."""
        row = allow_all(1, self.vocab_size)[0]
        i = self.call_ids[0]
        if i is None:
            raise ConstraintError("tool_choice 'none' needs a tokenizer with a <tool_call> "
                                  "token; this one spells it in pieces", "tool_choice")
        row.view(np.uint32)[i // 32] &= np.uint32(0xFFFFFFFF ^ (1 << (i % 32)))
        return row


def fill(matcher: llguidance.LLMatcher, masks: np.ndarray, row: int) -> None:
    """masks[row] = the tokens `matcher` allows next."""
    llnp.fill_next_token_bitmask(matcher, masks, row)

