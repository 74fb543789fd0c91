"""tarl_jax: Turn-level Adjudicated RL for speech-and-text tool-use agents in JAX/Flax."""

__version__ = "0.1.0"
