"""Speech input for the Qwen2.5-Omni thinker: Whisper log-mel features and the audio encoder.

Log-mel (`log_mel`) reproduces transformers' `WhisperFeatureExtractor(feature_size=128)` as the
Qwen2.5-Omni processor calls it (audio zero-padded to 30 s, valid frames = ceil(samples / 160)),
but on a bucketed buffer instead of always 30 s. The result is the same because
  * a frame is centred at k*160 and spans 400 samples, so frames < ceil(n/160) + 2 only see the
    first ceil(n/160)*160 + 400 samples, all of which the bucket holds (zeros past n);
  * the "max - 8" clamp is taken over the whole buffer, and frames of pure zero padding sit at the
    floor log10(1e-10) = -10, below any max, so extra or missing padding frames do not move it.
Audio longer than 30 s is truncated, as the processor does.

The encoder (`AudioEncoder`) works on fixed-size chunks of 2*n_window mel frames (2 s): every
chunk is convolved, position-embedded and attended on its own, so chunks of many utterances are
one batch [C, n_mels, 2*n_window] with per-chunk valid lengths. Each full chunk yields
n_window/2 tokens (25 per second); the last chunk of an utterance is shorter and the ones after
it are padding (length 0). `chunk_plan` + `take_chunks` lay utterances out as chunks.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tarl_jax.models import bucket

SAMPLE_RATE = 16_000
N_FFT = 400
HOP = 160
MAX_SAMPLES = 30 * SAMPLE_RATE
BUCKET_SAMPLES = 2 * SAMPLE_RATE  # one 2 s encoder chunk: buffers split into whole chunks


# ----------------------------------------------------------------------------- log-mel

def _hz_to_mel(f):
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, np.float64)
    log_step = 27.0 / np.log(6.4)
    return np.where(f < 1000.0, 3.0 * f / 200.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * log_step)


def _mel_to_hz(m):
    m = np.asarray(m, np.float64)
    log_step = 27.0 / np.log(6.4)
    return np.where(m < 15.0, 200.0 * m / 3.0, 1000.0 * np.exp((m - 15.0) / log_step))


def mel_filters(n_mels: int = 128, sr: int = SAMPLE_RATE, n_fft: int = N_FFT,
                fmin: float = 0.0, fmax: float = 8000.0) -> np.ndarray:
    """[n_fft//2 + 1, n_mels] triangular filters on the Slaney scale, each of unit area (slaney norm)."""
    fft_hz = np.linspace(0.0, sr / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (fft_hz[:, None] - lower) / (centre - lower)
    falling = (upper - fft_hz[:, None]) / (upper - centre)
    tri = np.maximum(0.0, np.minimum(rising, falling))
    return (tri * (2.0 / (upper - lower))).astype(np.float32)


def num_frames(num_samples) -> np.ndarray:
    """Valid mel frames of an utterance (what the processor's attention mask counts)."""
    n = np.minimum(np.asarray(num_samples), MAX_SAMPLES)
    return -(-n // HOP)


def bucket_samples(num_samples: int, multiple: int = BUCKET_SAMPLES) -> int:
    """Smallest buffer (a multiple of `multiple`, at most 30 s) giving exact features."""
    need = int(num_frames(num_samples)) * HOP + N_FFT
    return min(MAX_SAMPLES, -(-need // multiple) * multiple)


def pad_waves(waves, multiple: int = BUCKET_SAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """List of 16 kHz mono waveforms -> ([B, S] float32 zero-padded to one bucket, lengths [B])."""
    waves = [np.asarray(w, np.float32)[:MAX_SAMPLES] for w in waves]
    size = max(bucket_samples(len(w), multiple) for w in waves)
    out = np.zeros((len(waves), size), np.float32)
    for i, w in enumerate(waves):
        out[i, :len(w)] = w
    return out, np.array([len(w) for w in waves], np.int32)


@jax.jit
def log_mel(waves, lengths):
    """[B, S] waveforms (S a multiple of 160), lengths [B] -> log-mel [B, 128, S // 160] float32.

    Samples at or past `lengths` are treated as zeros. Frames >= num_frames(length) are padding.
    """
    b, s = waves.shape
    waves = jnp.where(jnp.arange(s) < lengths[:, None], waves.astype(jnp.float32), 0.0)
    padded = jnp.pad(waves, ((0, 0), (N_FFT // 2, N_FFT // 2)), mode="reflect")
    n = s // HOP  # the extractor computes 1 + s // HOP frames and drops the last
    # Frame k = hops k, k+1 and half of k+2 (400 = 2.5 * 160): slices, no gather.
    hops = padded[:, :(n + 2) * HOP].reshape(b, n + 2, HOP)
    frames = jnp.concatenate([hops[:, :n], hops[:, 1:n + 1], hops[:, 2:, :N_FFT - 2 * HOP]], axis=-1)
    frames = frames * jnp.asarray(np.hanning(N_FFT + 1)[:-1], jnp.float32)  # periodic Hann
    power = jnp.abs(jnp.fft.rfft(frames, n=N_FFT, axis=-1)) ** 2          # [B, n, 201]
    mel = jnp.einsum("bnf,fm->bmn", power, jnp.asarray(mel_filters()),
                     precision=jax.lax.Precision.HIGHEST)
    logs = jnp.log10(jnp.maximum(mel, 1e-10))
    logs = jnp.maximum(logs, logs.max(axis=(1, 2), keepdims=True) - 8.0)
    return (logs + 4.0) / 4.0


def features(waves) -> tuple[jax.Array, np.ndarray]:
    """List of waveforms -> (log-mel [B, 128, F], valid frames [B]); F is bucketed."""
    buf, lengths = pad_waves(waves)
    return log_mel(buf, lengths), num_frames(lengths)


# ----------------------------------------------------------------------------- chunking

def output_tokens(frames) -> np.ndarray:
    """Audio tokens for `frames` mel frames: conv2 halves (ceil), the pool halves (floor)."""
    after_conv = (np.asarray(frames) - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def chunk_plan(frames, frames_per_row: int, window: int = 200, minimum: int = 8):
    """Where each utterance's chunks come from in a [B, M, frames_per_row] feature batch.

    Returns (src [C], lens [C]) numpy int32: chunk c is row-major chunk src[c] of the batch
    reshaped to [B * frames_per_row / window, M, window] and has lens[c] valid frames. Only
    chunks holding frames are kept; C is padded to a power of two with length-0 chunks.
    """
    if frames_per_row % window:
        raise ValueError(f"frames_per_row={frames_per_row} is not a multiple of the chunk window {window}")
    per_row = frames_per_row // window
    src, lens = [], []
    for b, f in enumerate(np.asarray(frames).tolist()):
        for k in range(-(-f // window)):
            src.append(b * per_row + k)
            lens.append(min(window, f - k * window))
    pad = bucket(len(src), minimum) - len(src)
    return np.array(src + [0] * pad, np.int32), np.array(lens + [0] * pad, np.int32)


def take_chunks(feats, src, window: int = 200):
    """[B, M, F] features -> [C, M, window] chunks picked by `src` (see chunk_plan)."""
    b, m, f = feats.shape
    chunks = feats.reshape(b, m, f // window, window).transpose(0, 2, 1, 3).reshape(-1, m, window)
    return chunks[src]


# ----------------------------------------------------------------------------- encoder

@dataclasses.dataclass(frozen=True)
class AudioConfig:
    num_mel_bins: int = 128
    d_model: int = 1280
    num_layers: int = 32
    num_heads: int = 20
    ffn_dim: int = 5120
    output_dim: int = 3584
    n_window: int = 100           # chunk = 2 * n_window mel frames
    max_source_positions: int = 1500
    dtype: str = "float32"
    param_dtype: str = "float32"

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "AudioConfig":
        if hf.get("activation_function", "gelu") != "gelu":
            raise ValueError(f"audio activation {hf['activation_function']!r} unsupported (gelu only)")
        if hf.get("scale_embedding"):
            raise ValueError("audio scale_embedding=True is not supported")
        cfg = dict(num_mel_bins=hf["num_mel_bins"], d_model=hf["d_model"], num_layers=hf["encoder_layers"],
                   num_heads=hf["encoder_attention_heads"], ffn_dim=hf["encoder_ffn_dim"],
                   output_dim=hf["output_dim"], n_window=hf["n_window"],
                   max_source_positions=hf.get("max_source_positions", 1500))
        cfg.update(overrides)
        return cls(**cfg)

    @property
    def window(self) -> int:
        return 2 * self.n_window

    @property
    def tokens_per_chunk(self) -> int:
        return self.n_window // 2


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's fixed position table: [sin | cos] over geometric timescales."""
    inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(-inc * np.arange(channels // 2, dtype=np.float32))
    t = np.arange(length, dtype=np.float32)[:, None] * inv[None]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


def _param(module, name, init, shape, axes, dtype):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(dtype))


class Dense(nn.Module):
    features: int
    axes: tuple
    bias: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        w = _param(self, "kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features),
                   self.axes, self.param_dtype)
        y = x @ w.astype(self.dtype)
        if self.bias:
            y = y + _param(self, "bias", nn.initializers.zeros, (self.features,), self.axes[1:],
                           self.param_dtype).astype(self.dtype)
        return y


class LayerNorm(nn.Module):
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = _param(self, "scale", nn.initializers.ones, (d,), ("embed",), self.param_dtype)
        bias = _param(self, "bias", nn.initializers.zeros, (d,), ("embed",), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias
        return y.astype(self.dtype)


class Conv(nn.Module):
    """Kernel-3 conv over time with zero padding 1, on [C, T, D_in]."""
    features: int
    stride: int
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        w = _param(self, "kernel", nn.initializers.normal(0.02), (3, x.shape[-1], self.features),
                   (None, None, "embed"), self.param_dtype)
        b = _param(self, "bias", nn.initializers.zeros, (self.features,), ("embed",), self.param_dtype)
        y = jax.lax.conv_general_dilated(x, w.astype(self.dtype), (self.stride,), [(1, 1)],
                                         dimension_numbers=("NWC", "WIO", "NWC"))
        return y + b.astype(self.dtype)


class EncoderLayer(nn.Module):
    cfg: AudioConfig

    @nn.compact
    def __call__(self, x, valid):
        c = self.cfg
        dt, pdt = c.dtype, c.param_dtype
        hd = c.d_model // c.num_heads
        h = LayerNorm(dt, pdt, name="attn_norm")(x)
        split = lambda y: y.reshape(*y.shape[:-1], c.num_heads, hd)
        q = split(Dense(c.d_model, ("embed", "q_heads"), True, dt, pdt, name="q")(h))
        k = split(Dense(c.d_model, ("embed", "q_heads"), False, dt, pdt, name="k")(h))
        v = split(Dense(c.d_model, ("embed", "q_heads"), True, dt, pdt, name="v")(h))
        scores = jnp.einsum("cthd,cshd->chts", q, k).astype(jnp.float32) / np.sqrt(hd)
        # Keys past a chunk's valid length are padding; padded queries are dropped later.
        scores = jnp.where(valid[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("chts,cshd->cthd", probs, v).reshape(x.shape)
        x = x + Dense(c.d_model, ("q_heads", "embed"), True, dt, pdt, name="o")(out)
        h = LayerNorm(dt, pdt, name="mlp_norm")(x)
        h = jax.nn.gelu(Dense(c.ffn_dim, ("embed", "mlp"), True, dt, pdt, name="fc1")(h), approximate=False)
        return x + Dense(c.d_model, ("mlp", "embed"), True, dt, pdt, name="fc2")(h)


class AudioEncoder(nn.Module):
    cfg: AudioConfig

    @nn.compact
    def __call__(self, mel, lens):
        """mel [C, n_mels, window] chunks, lens [C] valid frames (0 = padding chunk).

        Returns (tokens [C, n_window/2, output_dim], valid [C, n_window/2] bool). Valid tokens,
        read chunk by chunk, are each utterance's audio tokens in order.
        """
        c = self.cfg
        dt, pdt = c.dtype, c.param_dtype
        frame_ok = jnp.arange(mel.shape[-1])[None, :] < lens[:, None]
        # Zero past the valid length: neighbouring frames in the buffer belong to padding.
        x = jnp.where(frame_ok[..., None], mel.transpose(0, 2, 1).astype(dt), 0)
        x = jax.nn.gelu(Conv(c.d_model, 1, dt, pdt, name="conv1")(x), approximate=False)
        x = jnp.where(frame_ok[..., None], x, 0)
        x = jax.nn.gelu(Conv(c.d_model, 2, dt, pdt, name="conv2")(x), approximate=False)
        t = x.shape[1]
        x = x + jnp.asarray(sinusoids(c.max_source_positions, c.d_model)[:t], dt)  # restarts per chunk
        after_conv = (lens - 1) // 2 + 1
        valid = jnp.arange(t)[None, :] < after_conv[:, None]
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        for i in range(c.num_layers):
            x = EncoderLayer(c, name=f"layers_{i}")(x, valid)
        # n_window is even, so pooling pairs never straddle chunks of one utterance.
        x = x.reshape(x.shape[0], t // 2, 2, -1).mean(axis=2)
        x = LayerNorm(dt, pdt, name="ln_post")(x)
        x = Dense(c.output_dim, (None, "embed"), True, dt, pdt, name="proj")(x)
        return x, jnp.arange(t // 2)[None, :] < (after_conv // 2)[:, None]


# HF tensor name (under `audio_tower.`) -> (our param path, layout). "{i}" is the layer index.
# Layouts: "T" = Linear [out, in] -> [in, out]; "conv" = Conv1d [out, in, k] -> [k, in, out].
TABLE = (
    ("conv1.weight", "conv1/kernel", "conv"), ("conv1.bias", "conv1/bias", "id"),
    ("conv2.weight", "conv2/kernel", "conv"), ("conv2.bias", "conv2/bias", "id"),
    ("ln_post.weight", "ln_post/scale", "id"), ("ln_post.bias", "ln_post/bias", "id"),
    ("proj.weight", "proj/kernel", "T"), ("proj.bias", "proj/bias", "id"),
    ("layers.{i}.self_attn_layer_norm.weight", "layers_{i}/attn_norm/scale", "id"),
    ("layers.{i}.self_attn_layer_norm.bias", "layers_{i}/attn_norm/bias", "id"),
    ("layers.{i}.self_attn.q_proj.weight", "layers_{i}/q/kernel", "T"),
    ("layers.{i}.self_attn.q_proj.bias", "layers_{i}/q/bias", "id"),
    ("layers.{i}.self_attn.k_proj.weight", "layers_{i}/k/kernel", "T"),
    ("layers.{i}.self_attn.v_proj.weight", "layers_{i}/v/kernel", "T"),
    ("layers.{i}.self_attn.v_proj.bias", "layers_{i}/v/bias", "id"),
    ("layers.{i}.self_attn.out_proj.weight", "layers_{i}/o/kernel", "T"),
    ("layers.{i}.self_attn.out_proj.bias", "layers_{i}/o/bias", "id"),
    ("layers.{i}.final_layer_norm.weight", "layers_{i}/mlp_norm/scale", "id"),
    ("layers.{i}.final_layer_norm.bias", "layers_{i}/mlp_norm/bias", "id"),
    ("layers.{i}.fc1.weight", "layers_{i}/fc1/kernel", "T"),
    ("layers.{i}.fc1.bias", "layers_{i}/fc1/bias", "id"),
    ("layers.{i}.fc2.weight", "layers_{i}/fc2/kernel", "T"),
    ("layers.{i}.fc2.bias", "layers_{i}/fc2/bias", "id"),
)
# In checkpoints but unused by the encoder's forward pass.
UNUSED = ("audio_bos_eos_token.weight",)
LAYOUTS = {"id": lambda x: x, "T": lambda x: x.T, "conv": lambda x: x.transpose(2, 1, 0)}


def table_entries(cfg: AudioConfig):
    """(HF name under audio_tower., param path tuple, layout) for every encoder parameter."""
    for hf, path, kind in TABLE:
        for i in (range(cfg.num_layers) if "{i}" in hf else [None]):
            yield hf.format(i=i), tuple(path.format(i=i).split("/")), kind


def boxed_params(cfg: AudioConfig, rng=None):
    mel = jnp.zeros((1, cfg.num_mel_bins, cfg.window), jnp.float32)
    init = lambda key: AudioEncoder(cfg).init(key, mel, jnp.zeros((1,), jnp.int32))["params"]
    return jax.eval_shape(init, jax.random.key(0)) if rng is None else init(rng)
