"""Speech mode: what a policy hears of a dialogue.

The simulated user speaks: each user message reaches the policy as the audio of its text in that
user's voice (TTS, cached on disk, optional tau2-style acoustic conditions), rendered as the Omni
thinker's `<|AUDIO|>` placeholders, 25 per second. Tool results, the system prompt and the agent's
own turns stay text, and the episode's `messages` keep the transcript (what the judge and the user
simulator read). The utterance is synthesised where the policy's prompt is rendered, from the
very text the user simulator produced: the same words, voice and conditions give the same samples,
so it is the user's utterance whichever side makes it.

An utterance is named by a hash of its samples (`ref`, the key of `omni.AudioEmbeddingCache`),
recorded on each agent turn whose prompt holds its placeholders. Embeddings are computed once per
utterance and encoder version, in one batched call per sampler round, and shared by the G samples
of a task and every round; with a frozen encoder also by every log-prob pass of the learner (a
trained one is run inside the train step on the utterances' log-mel, `mel_rows`). A ref stays
resolvable for the whole run: the view keeps its (text, voice) and re-synthesises (a TTS cache
hit) if the bounded wave and embedding caches have let it go.
"""
from __future__ import annotations

import collections
import threading

import numpy as np

from tarl_jax.models import omni
from tarl_jax.sandbox import speech


class SpeechView:
    def __init__(self, tts: speech.TTS, cfg: omni.ThinkerConfig, audio_params, *,
                 conditions: speech.Conditions | None = None, seed: int = 0, max_items: int = 4096):
        self.tts, self.cfg, self.conditions, self.seed = tts, cfg, conditions, seed
        self.embeds = omni.AudioEmbeddingCache(cfg, audio_params, max_items=max_items)
        self.sources: dict[str, tuple[str, speech.Voice]] = {}
        self.waves: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self.max_items = max_items
        self.lock = threading.Lock()   # episode threads synthesise concurrently

    @property
    def width(self) -> int:
        return self.cfg.audio.output_dim

    def voice(self, user_id: str) -> speech.Voice:
        return speech.voice_for_user(self.tts.engine, user_id or "anonymous", self.seed)

    def hear(self, text: str, user_id: str) -> tuple[str, int]:
        """(ref, number of <|AUDIO|> placeholders) of `text` spoken by `user_id`."""
        voice = self.voice(user_id)
        wave = self.tts(text or " ", voice, self.conditions)
        ref = self.embeds.key(wave)
        with self.lock:
            self.sources[ref] = (text or " ", voice)
            self._keep(ref, wave)
        return ref, int(omni.audio_token_count(len(wave)))

    def _keep(self, ref: str, wave: np.ndarray) -> None:
        self.waves[ref] = wave
        self.waves.move_to_end(ref)
        while len(self.waves) > self.max_items:
            self.waves.popitem(last=False)

    def _wave(self, ref: str) -> np.ndarray:
        with self.lock:
            if ref in self.waves:
                return self.waves[ref]
            if ref not in self.sources:
                raise KeyError(f"audio ref {ref[:12]}... was never heard by this SpeechView")
            text, voice = self.sources[ref]
        wave = self.tts(text, voice, self.conditions)
        with self.lock:
            self._keep(ref, wave)
        return wave

    def embeddings(self, refs) -> list[np.ndarray]:
        """[n_i, D] per ref (call from one thread: the encoder cache is not thread-safe)."""
        return self.embeds.lookup(list(refs), self._wave)

    def set_encoder(self, params) -> None:
        """A trained encoder's new weights: embeddings from the old ones are dropped."""
        if params is not self.embeds.params:
            self.embeds.params = params
            self.embeds.items.clear()

    def token_counts(self, refs) -> list[int]:
        """<|AUDIO|> placeholders of each utterance."""
        return [int(omni.audio_token_count(len(self._wave(r)))) for r in refs]

    def mel_rows(self, row_refs) -> tuple[np.ndarray, np.ndarray]:
        """Per row, its utterances' log-mel chunks: what a train step that runs the encoder
        takes (see omni.audio_row_inputs)."""
        return omni.audio_row_inputs([[self._wave(r) for r in refs] for refs in row_refs], self.cfg)

    def stream(self, refs) -> np.ndarray | None:
        """The refs' embeddings concatenated [sum n_i, D] (None when there are none)."""
        parts = self.embeddings(refs) if refs else []
        return np.concatenate(parts) if parts else None

    def speak_messages(self, messages: list[dict], user_id: str) -> tuple[list[dict], list[str]]:
        """User messages -> one audio part each; returns (messages, refs in placeholder order)."""
        out, refs = [], []
        for m in messages:
            if m.get("role") == "user" and isinstance(m.get("content"), str):
                ref, n = self.hear(m["content"], user_id)
                refs.append(ref)
                m = {**m, "content": [{"type": "audio", "num_tokens": n}]}
            out.append(m)
        return out, refs
