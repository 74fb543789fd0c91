"""What the LLM judge and the LLM user simulator share about an OpenAI-compatible endpoint's
answers: which are usable, and how long a refusal asks to wait.

The `openai` client hands back whatever a 200 carried (a string when the body is not JSON, an
object without `choices`, content that is not text): `completion_answer` checks the shape and
raises one of MALFORMED, which both callers count as a failed try and retry, never an exception
out of a rollout or a training step.
"""
from __future__ import annotations

import email.utils
import time

MALFORMED = (ValueError, TypeError, AttributeError, KeyError)


def completion_answer(resp) -> dict:
    """{"content", "finish_reason"} of a chat completion; ValueError if `resp` is not one."""
    choices = getattr(resp, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise ValueError(f"answer without choices: {str(resp)[:200]!r}")
    content = getattr(getattr(choices[0], "message", None), "content", None)
    if content is not None and not isinstance(content, str):
        raise ValueError(f"message content is {type(content).__name__}, not text")
    return {"content": content or "", "finish_reason": getattr(choices[0], "finish_reason", None)}


def retry_after(response, cap: float) -> float:
    """Seconds a 429/503 asks to wait (Retry-After in seconds or as an HTTP date), in [0, cap]."""
    value = getattr(response, "headers", {}).get("retry-after")
    if not value:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return 0.0
    return min(max(seconds, 0.0), cap)


def token_count(usage, name: str) -> int:
    value = getattr(usage, name, 0)
    return value if isinstance(value, int) else 0
