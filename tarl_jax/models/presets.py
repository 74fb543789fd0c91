"""Named model shapes: a tiny one that trains on 2 CPU cores, and real ones (random weights for
benchmarks; real weights come from `models.hf`)."""
from __future__ import annotations

import dataclasses

from tarl_jax.models.audio import AudioConfig
from tarl_jax.models.qwen import DecoderConfig

PRESETS = {
    # Qwen3-style (q/k norm) at laptop scale: the embedded default trains it for minutes on 2 CPU
    # cores over ~2k-token dialogues; vocab = the tiny tokenizer's 2048 ids.
    "tiny": DecoderConfig(vocab_size=2048, hidden_size=64, intermediate_size=192, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e4, qk_norm=True,
                          tie_embeddings=True, model_type="qwen3"),
    # One small layer: end-to-end tests of the trainer (compiles and steps in seconds).
    "micro": DecoderConfig(vocab_size=2048, hidden_size=32, intermediate_size=64, num_layers=1,
                           num_heads=2, num_kv_heads=1, head_dim=16, rope_theta=1e4, qk_norm=True,
                           tie_embeddings=True, model_type="qwen3"),
    "smollm2-135m": DecoderConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                  num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                                  rope_theta=1e5, rms_eps=1e-5, tie_embeddings=True,
                                  model_type="llama"),
    "qwen3-1.7b": DecoderConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                                qk_norm=True, tie_embeddings=True, model_type="qwen3"),
    # Qwen2.5-7B, the Qwen2.5-Omni-7B thinker's decoder (launch.compile's shape for
    # configs/omni_7b_speech.py when no checkpoint's config.json is at hand).
    "qwen2.5-7b": DecoderConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
                                qkv_bias=True, tie_embeddings=False, model_type="qwen2"),
    "qwen3-8b": DecoderConfig(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                              num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
                              qk_norm=True, tie_embeddings=False, model_type="qwen3"),
}


def get(name: str) -> DecoderConfig:
    if name not in PRESETS:
        raise KeyError(f"model preset {name!r} unknown; choose from {sorted(PRESETS)}")
    return PRESETS[name]


# Audio encoders for speech mode (Qwen2.5-Omni's layout; output_dim is set to the decoder width).
AUDIO_PRESETS = {
    "tiny": AudioConfig(d_model=64, num_layers=2, num_heads=4, ffn_dim=128, output_dim=64),
    "micro": AudioConfig(d_model=32, num_layers=1, num_heads=2, ffn_dim=64, output_dim=32),
}


def audio(name: str, output_dim: int) -> AudioConfig:
    if name not in AUDIO_PRESETS:
        raise KeyError(f"audio preset {name!r} unknown; choose from {sorted(AUDIO_PRESETS)}")
    return dataclasses.replace(AUDIO_PRESETS[name], output_dim=output_dim)
