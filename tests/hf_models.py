"""Tiny random transformers models (the numerical reference) shared by the checkpoint tests.

torch and transformers are imported inside the functions that need them, so the 8-device
subprocess, which only computes JAX logits, starts quickly.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from tarl_jax.models import qwen

_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2)

CONFIGS = {  # kind -> (transformers config class, its arguments)
    # q/k/v biases, GQA, untied; heads divisible by a 4-way tensor axis for the mesh test.
    "qwen2": ("Qwen2Config", dict(_COMMON, num_attention_heads=8, num_key_value_heads=4,
                                  tie_word_embeddings=False)),
    # q/k norms, explicit head_dim != hidden/heads, GQA, tied.
    "qwen3": ("Qwen3Config", dict(_COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                  tie_word_embeddings=True)),
    # plain multi-head attention, untied, Llama's own rope theta.
    "llama": ("LlamaConfig", dict(_COMMON, num_attention_heads=4, num_key_value_heads=4,
                                  tie_word_embeddings=False, rope_theta=10000.0)),
}

TOKENS = np.random.RandomState(0).randint(0, _COMMON["vocab_size"], (2, 12))


def build(kind: str, seed: int = 0, **overrides):
    import torch
    import transformers
    cls, kwargs = CONFIGS[kind]
    torch.manual_seed(seed)
    config = getattr(transformers, cls)(**{**kwargs, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # HF inits biases to 0 and norms to 1: randomise so they are tested
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def torch_logits(model, tokens=TOKENS) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def jax_logits(cfg, params, tokens=TOKENS) -> np.ndarray:
    return np.asarray(_logits(cfg, params, np.asarray(tokens)))


@functools.partial(jax.jit, static_argnums=0)  # one compile beats eager's per-op compiles
def _logits(cfg, params, tokens):
    model = qwen.Decoder(cfg)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    hidden, _ = model.apply({"params": params}, tokens, positions)
    return model.apply({"params": params}, hidden, method=qwen.Decoder.logits)
