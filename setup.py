"""tarl_jax: Turn-level Adjudicated RL for speech-and-text tool-use agents, in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="tarl_jax",
    version="0.1.0",
    description="Turn-level Adjudicated RL (TARL) for tool-use agents in JAX/Flax",
    packages=find_packages(include=["tarl_jax", "tarl_jax.*"]),
    package_data={"tarl_jax": ["assets/*", "assets/**/*"]},
    # Tested on 3.11 (CI) and 3.12 (Colab's). Every pin resolves on 3.13 too, but it is untested.
    python_requires=">=3.11,<3.13",
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "ml-collections==1.1.0",
        "absl-py>=2.1",
        "transformers>=5.0,<6",
        "tokenizers>=0.22",
        "safetensors>=0.5",
        "gguf==0.19.0",
        "openai>=1.60",
        "numpy>=2.0",
        "scipy>=1.12",         # intervals (stats.py); jax needs it too
        "tensorboardx>=2.6",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        # Math task family: procedural problems (offline) and answer grading.
        "reasoning-gym==0.1.25",
        "math-verify==0.9.0",
        # Sandbox tools served to external agents over the Model Context Protocol.
        "mcp==2.3.0",
        # The OpenAI-compatible server's HTTP layer (serve.py); mcp needs them too.
        "starlette>=0.40",
        "uvicorn>=0.30",
        # The server's structured outputs (constrain.py): JSON-schema and Lark grammars as
        # token masks.
        "llguidance>=1.9,<2",
        "prometheus-client>=0.20",   # the server's /metrics
        "pydantic>=2.6",             # the server's request models (chat_api.py)
        # RL curriculum: task datasets as TFDS builders written to array_record, read with grain
        # (neither needs TensorFlow). tensorflow-datasets 4.9.10 imports importlib_resources on
        # every Python but declares it only below 3.9.
        "tensorflow-datasets==4.9.10",
        "grain==0.2.18",
        "array-record==0.8.6",
        "importlib-resources==7.1.0",
    ],
    extras_require={
        # torch is the numerical reference only; pinned because an unpinned torch pulls a CUDA build.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6", "torch==2.13.0", "jsonschema>=4.20",
                 # the Colab notebooks are executed by the suite
                 "nbclient==0.11.0", "nbformat==5.11.1", "ipykernel==7.4.0"],
    },
)
