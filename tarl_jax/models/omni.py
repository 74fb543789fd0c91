"""Qwen2.5-Omni thinker: audio encoder + Qwen2 decoder, with speech in and text out.

Audio enters as a flat stream of audio tokens: the encoder's valid outputs, chunk after chunk,
utterance after utterance. The prompt holds one `<|AUDIO|>` placeholder per audio token
(`audio_token_count`), and placeholders, read row-major over the batch, take the stream in order
(as transformers' `masked_scatter` does). Without images or video the model's multimodal RoPE
gets the same consecutive index on all three components (audio spans included), which is plain
1D RoPE: the decoder is `qwen.Decoder` unchanged (tests/test_omni.py checks logits end to end).

With `freeze_audio` the encoder gets no gradient, and `AudioEmbeddingCache` encodes each distinct
utterance once (keyed by a hash of its samples) and hands the same embeddings to every sample
and log-prob pass that hears it.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import json
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from tarl_jax import sharding as shd
from tarl_jax.models import audio, bucket, hf, qwen

AUDIO_TOKEN_ID = 151646  # <|AUDIO|> in Qwen2.5-Omni checkpoints
# Parts of a full Omni checkpoint the thinker does not use (speech output, vision).
SKIPPED = ("talker.", "token2wav.", "visual.")


@dataclasses.dataclass(frozen=True)
class ThinkerConfig:
    audio: audio.AudioConfig
    text: qwen.DecoderConfig
    audio_token_id: int = AUDIO_TOKEN_ID
    freeze_audio: bool = False

    @classmethod
    def from_hf(cls, hf_cfg: dict, text_overrides: dict | None = None, audio_overrides: dict | None = None,
                **overrides) -> "ThinkerConfig":
        """From a full Omni config.json (`thinker_config` inside) or a thinker-only one.
        text_/audio_overrides go to DecoderConfig/AudioConfig (e.g. dtype, scan_layers)."""
        th = hf_cfg.get("thinker_config", hf_cfg)
        for key in ("audio_config", "text_config"):
            if key not in th:
                raise ValueError(f"thinker config lacks {key!r} (model_type={hf_cfg.get('model_type')!r})")
        text = dict(th["text_config"])
        if text.get("use_sliding_window"):
            raise ValueError("text_config.use_sliding_window=True is not supported")
        # The lm_head tie is the thinker's setting; text_config's own flag is not what HF applies.
        text.update(model_type="qwen2", tie_word_embeddings=th.get("tie_word_embeddings", False))
        token = th.get("audio_token_id", th.get("audio_token_index", AUDIO_TOKEN_ID))
        if th["audio_config"]["output_dim"] != text["hidden_size"]:
            raise ValueError(f"audio_config.output_dim={th['audio_config']['output_dim']} differs from "
                             f"text_config.hidden_size={text['hidden_size']}")
        return cls(audio=audio.AudioConfig.from_hf(th["audio_config"], **(audio_overrides or {})),
                   text=qwen.DecoderConfig.from_hf(text, **(text_overrides or {})),
                   audio_token_id=int(token), **overrides)


def audio_token_count(num_samples) -> np.ndarray:
    """`<|AUDIO|>` placeholders an utterance of `num_samples` 16 kHz samples needs."""
    return audio.output_tokens(audio.num_frames(num_samples))


def compact(tokens, valid):
    """[C, P, D] chunk outputs + [C, P] validity -> [C*P, D] with the valid rows first, in order."""
    flat, ok = tokens.reshape(-1, tokens.shape[-1]), valid.reshape(-1)
    dest = jnp.where(ok, jnp.cumsum(ok) - 1, ok.size)
    return jnp.zeros_like(flat).at[dest].set(flat, mode="drop")


@functools.partial(jax.jit, static_argnums=0)
def encode_stream(cfg: audio.AudioConfig, params, mel, mel_lens):
    """Encoder alone (params = the `audio_tower` subtree): mel chunks -> audio token stream."""
    return compact(*audio.AudioEncoder(cfg).apply({"params": params}, mel, mel_lens))


def encode_rows(cfg: audio.AudioConfig, params, mel, mel_lens):
    """Per-row encoder (a trained encoder inside the train step): mel [R, C, n_mels, window],
    valid frames [R, C] -> [R, C*window/4, D], each row's audio tokens first, in order."""
    enc = audio.AudioEncoder(cfg)
    return jax.vmap(lambda m, n: compact(*enc.apply({"params": params}, m, n)))(mel, mel_lens)


def merge_audio(embeds, tokens, audio_embeds, audio_token_id):
    """Put audio_embeds [N, D] (a stream, consumed in order) at the placeholder positions."""
    is_audio = tokens == audio_token_id
    idx = jnp.cumsum(is_audio.reshape(-1)).reshape(tokens.shape) - 1
    idx = jnp.clip(idx, 0, audio_embeds.shape[0] - 1)
    return jnp.where(is_audio[..., None], audio_embeds[idx].astype(embeds.dtype), embeds)


def merge_audio_rows(embeds, tokens, audio_rows, audio_token_id):
    """Per-row form of `merge_audio`: row b's placeholders take audio_rows[b] [A, D] in order.

    What batched training and sampling use: a row's audio travels with its row (so it shards
    with the batch), instead of one stream shared by the whole batch."""
    is_audio = tokens == audio_token_id
    idx = jnp.clip(jnp.cumsum(is_audio, axis=1) - 1, 0, audio_rows.shape[1] - 1)
    picked = jnp.take_along_axis(audio_rows, idx[..., None], axis=1)
    return jnp.where(is_audio[..., None], picked.astype(embeds.dtype), embeds)


def audio_rows(streams, width: int, minimum: int = 16) -> np.ndarray:
    """Per-row audio streams (each [n_b, D] or None) -> [B, A, D] zero-padded, A a power of two
    >= `minimum` (bucketed so each jitted shape compiles once)."""
    size = bucket(max((len(s) for s in streams if s is not None), default=0), minimum)
    dtype = next((s.dtype for s in streams if s is not None and len(s)), np.float32)
    out = np.zeros((len(streams), size, width), dtype)
    for b, s in enumerate(streams):
        if s is not None and len(s):
            out[b, :len(s)] = s
    return out


class Thinker(nn.Module):
    cfg: ThinkerConfig

    def setup(self):
        self.audio_tower = audio.AudioEncoder(self.cfg.audio)
        self.model = qwen.Decoder(self.cfg.text)

    def encode_audio(self, mel, mel_lens):
        """mel chunks [C, n_mels, window] + valid frames [C] -> audio token stream [C*window/4, D]."""
        out = compact(*self.audio_tower(mel, mel_lens))
        return jax.lax.stop_gradient(out) if self.cfg.freeze_audio else out

    def __call__(self, tokens, positions, segment_ids=None, cache=None, mel=None, mel_lens=None,
                 audio_embeds=None):
        """Like `qwen.Decoder.__call__`, plus audio: either mel chunks (`mel`, `mel_lens`, see
        `audio_inputs`) or a precomputed token stream `audio_embeds` [N, D] (see
        `AudioEmbeddingCache.stream`). Returns (hidden, cache)."""
        if mel is not None:
            audio_embeds = self.encode_audio(mel, mel_lens)
        embeds = None
        if audio_embeds is not None:
            embeds = merge_audio(self.model.embed(tokens), tokens, audio_embeds, self.cfg.audio_token_id)
        return self.model(tokens, positions, segment_ids, cache, embeds=embeds)

    def logits(self, hidden):
        return self.model.logits(hidden)

    def output_matrix(self):
        return self.model.output_matrix()


# ----------------------------------------------------------------------------- host-side audio prep

def audio_inputs(waves, cfg: ThinkerConfig, minimum_chunks: int = 8):
    """Waveforms -> (mel chunks [C, n_mels, window], valid frames [C], tokens per utterance [A]).

    C is a power of two (>= minimum_chunks); sample buffers are bucketed to whole 2 s chunks.
    """
    window = cfg.audio.window
    buf, lengths = audio.pad_waves(waves, multiple=window * audio.HOP)
    frames = audio.num_frames(lengths)
    src, lens = audio.chunk_plan(frames, buf.shape[1] // audio.HOP, window, minimum_chunks)
    mel = audio.take_chunks(audio.log_mel(buf, lengths), src, window)
    return mel, lens, audio.output_tokens(frames)


def audio_row_inputs(row_waves, cfg: ThinkerConfig, minimum_chunks: int = 8):
    """Per-row utterances [[wave, ...], ...] -> (mel [R, C, n_mels, window], valid frames [R, C]):
    what `encode_rows` takes. C (a power of two) is shared by all rows; rows with no audio are
    all padding chunks."""
    window = cfg.audio.window
    chunks = [sum(-(-int(f) // window) for f in audio.num_frames([len(w) for w in ws]))
              for ws in row_waves]
    c = bucket(max(chunks, default=0), minimum_chunks)
    mel = np.zeros((len(row_waves), c, cfg.audio.num_mel_bins, window), np.float32)
    lens = np.zeros((len(row_waves), c), np.int32)
    for r, ws in enumerate(row_waves):
        if ws:
            m, n, _ = audio_inputs(ws, cfg, minimum_chunks=c)
            mel[r], lens[r] = np.asarray(m), n
    return mel, lens


def check_placeholders(tokens, audio_tokens: int, audio_token_id: int = AUDIO_TOKEN_ID):
    """Host-side check (jit cannot raise): placeholders must equal the audio tokens supplied."""
    n = int(np.sum(np.asarray(tokens) == audio_token_id))
    if n != int(audio_tokens):
        raise ValueError(f"{n} <|AUDIO|> placeholders (id {audio_token_id}) but {int(audio_tokens)} "
                         "audio tokens; expand each utterance to audio_token_count(samples) placeholders")


class AudioEmbeddingCache:
    """Per-utterance audio embeddings of a frozen encoder, keyed by a hash of the samples.

    `stream(waves)` returns the flat audio token stream for a batch, encoding only utterances it
    has not seen (in one bucketed call). Bounded LRU of `max_items` utterances, held on the host.
    """

    def __init__(self, cfg: ThinkerConfig, audio_params, max_items: int = 4096):
        self.cfg, self.params, self.max_items = cfg, audio_params, max_items
        self.items: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def key(wave) -> str:
        return hashlib.sha256(np.ascontiguousarray(wave, np.float32).tobytes()).hexdigest()

    def get(self, waves) -> list[np.ndarray]:
        """[n_tokens_i, D] embeddings per utterance."""
        keys = [self.key(w) for w in waves]
        return self.lookup(keys, dict(zip(keys, waves)).__getitem__)

    def lookup(self, keys, wave_of) -> list[np.ndarray]:
        """Embeddings for utterance keys; `wave_of(key)` is asked only for keys not cached."""
        todo = [k for k in dict.fromkeys(keys) if k not in self.items]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if todo:
            mel, lens, counts = audio_inputs([wave_of(k) for k in todo], self.cfg)
            flat = np.asarray(encode_stream(self.cfg.audio, self.params, mel, lens))
            for k, start, n in zip(todo, np.cumsum(counts) - counts, counts):
                self.items[k] = flat[start:start + n]
        out = []
        for k in keys:
            self.items.move_to_end(k)
            out.append(self.items[k])
        while len(self.items) > self.max_items:
            self.items.popitem(last=False)
        return out

    def stream(self, waves, size: int | None = None) -> np.ndarray:
        """[size, D] token stream (utterances in order, zero-padded; size defaults to a power of two)."""
        parts = self.get(waves)
        n = sum(len(p) for p in parts)
        size = size or bucket(n, minimum=64)
        if n > size:
            raise ValueError(f"{n} audio tokens do not fit a stream of size {size}")
        out = np.zeros((size, self.cfg.audio.output_dim), parts[0].dtype if parts else np.float32)
        if parts:
            out[:n] = np.concatenate(parts)
        return out


# ----------------------------------------------------------------------------- params and loading

def boxed_params(cfg: ThinkerConfig, rng=None):
    return {"audio_tower": audio.boxed_params(cfg.audio, rng),
            "model": qwen.boxed_params(cfg.text, rng)}


def init_params(cfg: ThinkerConfig, rng):
    a, t = jax.random.split(rng)
    return nn.unbox({"audio_tower": audio.boxed_params(cfg.audio, a), "model": qwen.boxed_params(cfg.text, t)})


def logical_axes(cfg: ThinkerConfig):
    return nn.get_partition_spec(boxed_params(cfg))


def trainable_mask(params, cfg: ThinkerConfig):
    """Bool pytree for optax.masked: everything but the audio tower when it is frozen."""
    return {"audio_tower": jax.tree.map(lambda _: not cfg.freeze_audio, params["audio_tower"]),
            "model": jax.tree.map(lambda _: True, params["model"])}


def _split_names(names, source):
    """Checkpoint names -> (prefix, audio names, decoder names). Accepts a full Omni checkpoint
    (`thinker.*` next to talker/token2wav) and a thinker saved on its own (no prefix)."""
    prefix = "thinker." if any(n.startswith("thinker.") for n in names) else ""
    audio_names, decoder_names, unexpected = [], [], []
    for n in names:
        if not n.startswith(prefix):  # full checkpoint: only talker/token2wav live beside the thinker
            if not n.startswith(SKIPPED):
                unexpected.append(n)
            continue
        rest = n[len(prefix):]
        if rest.startswith(SKIPPED):
            continue
        if rest.startswith("audio_tower."):
            audio_names.append(n)
        elif rest.startswith(("model.", "lm_head.")):
            decoder_names.append(n)
        else:
            unexpected.append(n)
    if unexpected:
        raise ValueError(f"{source}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} unexpected)")
    return prefix, audio_names, decoder_names


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _load_audio(cfg: ThinkerConfig, tensors, prefix, source, mesh, rules):
    """tensors: checkpoint name -> lazy safetensors slice, for the audio_tower.* names."""
    boxed = audio.boxed_params(cfg.audio)
    abstract = nn.unbox(boxed)
    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, abstract)
    else:
        shardings = shd.logical_sharding(nn.get_partition_spec(boxed), mesh, rules or shd.DEFAULT_RULES)
    entries = list(audio.table_entries(cfg.audio))
    base = prefix + "audio_tower."
    known = {base + n for n, _, _ in entries} | {base + n for n in audio.UNUSED}
    extra = sorted(set(tensors) - known)
    if extra:
        raise ValueError(f"{source}: unexpected audio tensor {extra[0]!r}; is audio_config right?")
    params: dict = {}
    for name, path, kind in entries:
        full, where = base + name, "audio_tower/" + "/".join(path)
        leaf = functools.reduce(lambda t, k: t[k], path, abstract)
        want = leaf.shape if kind == "id" else leaf.shape[::-1]  # HF stores Linear/Conv transposed
        if full not in tensors:
            raise ValueError(f"{source}: missing tensor {full!r} (param {where})")
        got = tuple(tensors[full].get_shape())
        if got != tuple(want):
            raise ValueError(f"{source}: tensor {full!r} has shape {got}, this config expects {tuple(want)} "
                             f"(param {where})")
        # The encoder is small next to the decoder: read each tensor whole, then cut device slices.
        x = audio.LAYOUTS[kind](np.asarray(tensors[full][:])).astype(cfg.audio.param_dtype)
        sharding = functools.reduce(lambda t, k: t[k], path, shardings)
        _set(params, path, jax.make_array_from_callback(x.shape, sharding, lambda idx, x=x: x[idx]))
    return params


def load_thinker(model_dir, cfg: ThinkerConfig | None = None, mesh=None, rules=None, dtype=None):
    """Load the thinker from an HF checkpoint directory: a full Qwen2.5-Omni one (`thinker.*`,
    talker/token2wav/visual skipped) or a thinker saved alone; single or sharded safetensors.
    Decoder tensors go through `hf`'s table (sharded, lazily sliced); `dtype` is the storage
    dtype of all parameters (default: the configs' param_dtype). Returns (cfg, params)."""
    model_dir = pathlib.Path(model_dir)
    if cfg is None:
        cfg = ThinkerConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
    if dtype is not None:
        name = jnp.dtype(dtype).name
        cfg = dataclasses.replace(cfg, audio=dataclasses.replace(cfg.audio, param_dtype=name),
                                  text=dataclasses.replace(cfg.text, param_dtype=name))
    with contextlib.ExitStack() as stack:
        lazy = {}
        for path in hf.safetensors_files(model_dir):
            f = stack.enter_context(safe_open(path, framework="numpy"))
            lazy.update((n, f.get_slice(n)) for n in f.keys())
        prefix, audio_names, decoder_names = _split_names(list(lazy), str(model_dir))
        tensors = {n[len(prefix):]: (tuple(lazy[n].get_shape()), lazy[n].__getitem__) for n in decoder_names}
        if cfg.text.tie_embeddings:
            tensors.pop("lm_head.weight", None)
        decoder = hf.load_tensors(cfg.text, tensors, str(model_dir), hf.HF, mesh, rules)
        audio_params = _load_audio(cfg, {n: lazy[n] for n in audio_names}, prefix, str(model_dir), mesh, rules)
    return cfg, {"audio_tower": audio_params, "model": decoder}


def apply(cfg: ThinkerConfig, params: Any, *args, **kwargs):
    """Thinker forward: (hidden, cache) = apply(cfg, params, tokens, positions, ...)."""
    return Thinker(cfg).apply({"params": params}, *args, **kwargs)
