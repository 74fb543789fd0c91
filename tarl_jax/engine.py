"""The decode engine beneath rollouts and the server: `Rows`, a batch of KV-cache rows over one
jitted Sampler, each row a conversation that grows by prefilled and sampled tokens.

Two scheduling strategies drive it, each in the module that owns its callers:
- `rollout.LockstepEngine`, rounds: every live episode hands over its new turn, one call prefills
  them all and decodes each row to the end of its turn. A round holds exactly the live episodes,
  so rollouts are deterministic for a seed.
- `serve.Engine`, continuous batching: rows decode `chunk` tokens at a time; between chunks
  finished rows are freed and waiting requests are prefilled into free rows, each into the row
  whose cache holds the longest prefix of its prompt (cut back to that prefix first).

Row keys: a row samples with fold_in(its base key, a counter), an episode's key and its round for
rollouts, a request's seed and its tokens so far for the server, so what a row samples never
depends on the other rows of the batch.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tarl_jax import sampler as sampler_lib

# (base keys [B], counters [B]) -> each row's key for its next decode call.
row_keys = jax.jit(jax.vmap(jax.random.fold_in))


@functools.partial(jax.jit, donate_argnums=0)
def _copy_rows(state: sampler_lib.DecodeState, src, dst) -> sampler_lib.DecodeState:
    """Rows dst[i] become copies of rows src[i]: cache (batch on axis 1), length, hidden."""
    cache = jax.tree.map(lambda x: x.at[:, dst].set(x[:, src]), state.cache)
    return sampler_lib.DecodeState(cache, state.length.at[dst].set(state.length[src]),
                                   state.hidden.at[dst].set(state.hidden[src]))


class Rows:
    """`batch` rows of one Sampler's cache.

    Args:
      sampler: the jitted model (its cache_len bounds every row).
      batch: rows.
      empty: start from an empty cache (rows fill one by one: the server); else the first
        `prefill` starts every row at once (rollouts' first round, one prefill call).
    """

    def __init__(self, sampler: sampler_lib.Sampler, batch: int, empty: bool = True):
        self.sampler, self.batch = sampler, batch
        self.state = sampler.empty_state(batch) if empty else None

    def lengths(self) -> list[int]:
        """Tokens each row holds (the position its next token takes)."""
        return [0] * self.batch if self.state is None else jax.device_get(self.state.length).tolist()

    def prefill(self, new: Sequence[Sequence[int]], audio=None, keep: dict | None = None,
                pad: int = 0) -> None:
        """Append new[b] (possibly empty) to row b, after cutting row b to keep[b] tokens: slots
        at and past a row's length are invisible to its queries and get overwritten. audio: per
        row None or the embeddings of its new `<|AUDIO|>` placeholders (Sampler.append). The
        first prefill of rows made with empty=False starts every row; one without tokens gets
        `pad`."""
        if self.state is None:
            self.state = self.sampler.start([list(ids) or [pad] for ids in new], audio)
            return
        if keep:
            lengths = np.array(self.state.length)
            lengths[list(keep)] = list(keep.values())
            self.state = self.state._replace(length=jnp.asarray(lengths))
        self.state = self.sampler.append(self.state, new, audio)

    def copy(self, pairs: dict[int, int]) -> None:
        """Row dst takes row src's tokens, for each {dst: src} (n choices of one prompt share its
        prefill)."""
        if pairs:
            dst, src = (np.array(x, np.int32) for x in zip(*pairs.items()))
            self.state = _copy_rows(self.state, src, dst)

    def decode(self, keys, **sampling) -> list[sampler_lib.Completion]:
        """Sampler.decode over every row (its per-row sampling settings; rows
        with max_new_tokens 0 ride along unchanged); keys: one per row (`row_keys`)."""
        self.state, outs = self.sampler.decode(self.state, seed=keys, **sampling)
        return outs
