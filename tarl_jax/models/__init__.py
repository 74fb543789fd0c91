"""Flax models (Qwen3 / Qwen2.5 decoder, Qwen2.5-Omni thinker), their checkpoints and tokenizers."""


def bucket(n: int, minimum: int = 8) -> int:
    """Next power of two >= n (at least `minimum`): every jitted shape is drawn from few sizes,
    so XLA compiles a handful of programs, at the cost of at most 2x padding."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())
