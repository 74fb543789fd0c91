"""What the LLM judge and the LLM user simulator share about an OpenAI-compatible endpoint:
one request with retries (`complete`), which answers are usable, and how long a refusal asks
to wait.

The `openai` client hands back whatever a 200 carried (a string when the body is not JSON, an
object without `choices`, content that is not text): `completion_answer` checks the shape and
raises one of MALFORMED, which both callers count as a failed try and retry, never an exception
out of a rollout or a training step.
"""
from __future__ import annotations

import asyncio
import contextlib
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


class Refused(RuntimeError):
    """The endpoint refused the request itself (a 4xx other than 429): retrying cannot help."""


class GaveUp(RuntimeError):
    """Every try failed; `errors` says why each did, in order."""

    def __init__(self, errors: list[str]):
        super().__init__(f"{len(errors)} attempts: " + " | ".join(errors))
        self.errors = errors


async def complete(create, *, max_retries: int, backoff_s: float, timeout_s: float,
                   max_retry_after_s: float, accept=None, slot=None, stats=None):
    """One chat completion with our retries (the client's own are off): a timeout of the whole
    answer, a 429 / 5xx (honouring Retry-After up to max_retry_after_s), a connection error or
    a malformed 200 is retried after backoff_s x 2^(try - 1) seconds.

    Args:
      create: () -> awaitable of the client's response (one request).
      accept(answer): raises one of MALFORMED for an answer to retry (e.g. empty, too long).
      slot: () -> async context manager held around each try (e.g. a concurrency semaphore).
      stats: counts, when given, on its attributes requests, transport_retries,
        malformed_answers, latency_s_total, latency_s_max.
    Returns:
      ({"content", "finish_reason"}, the response).
    Raises:
      Refused, or GaveUp after max_retries + 1 failed tries.
    """
    import openai   # imported on use: it takes seconds, and offline runs never need it
    errors, wait = [], 0.0
    for attempt in range(max_retries + 1):
        if attempt:
            if stats is not None:
                stats.transport_retries += 1
            await asyncio.sleep(max(wait, backoff_s * 2 ** (attempt - 1)))
        wait = 0.0
        async with (slot() if slot else contextlib.nullcontext()):
            t0 = time.perf_counter()
            try:
                # The client's timeout is per read; wait_for bounds the whole answer.
                resp = await asyncio.wait_for(create(), timeout_s)
                answer = completion_answer(resp)
                if accept is not None:
                    accept(answer)
                return answer, resp
            except asyncio.TimeoutError:
                errors.append(f"no whole answer within timeout={timeout_s} s")
            except openai.APIStatusError as e:
                if e.status_code != 429 and e.status_code < 500:
                    raise Refused(f"HTTP {e.status_code}: {e}") from e
                errors.append(f"HTTP {e.status_code}: {type(e).__name__}: {e}")
                wait = retry_after(e.response, max_retry_after_s)
            except openai.APIError as e:      # timeout, connection, unreadable response
                errors.append(f"{type(e).__name__}: {e}")
            except MALFORMED as e:            # a 200 that is not a (usable) chat completion
                if stats is not None:
                    stats.malformed_answers += 1
                errors.append(f"malformed answer: {type(e).__name__}: {e}")
            finally:
                if stats is not None:
                    dt = time.perf_counter() - t0
                    stats.requests += 1
                    stats.latency_s_total += dt
                    stats.latency_s_max = max(stats.latency_s_max, dt)
    raise GaveUp(errors)
