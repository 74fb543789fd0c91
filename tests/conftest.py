"""Shared fixtures.

Tests that need ../shared/ (tau-bench data, references) take the `shared_dir` or `taubench_dir`
fixture: outside users without it get a skip that says why; under CI (`CI=true`) it is always
present, so its absence is a failure: a skipped conformance test proves nothing.
"""
import os
import pathlib
import shutil
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# One persistent XLA compilation cache for the whole session, made before jax is imported: the
# xdist workers and the main jobs the tests launch inherit it, so the same tiny programs compile
# once, not once per process (a test that launches the main job five times: 597 s -> 348 s).
# Keys hash the whole program, compile options and jax version, so a hit is the same executable;
# a half-written entry (a process killed mid-write) only costs a warning and a recompile. A
# fresh directory per session: nothing carries over between runs.
_XLA_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = tempfile.mkdtemp(prefix="tarl-jax-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_unconfigure(config):
    if _XLA_CACHE:   # only the process that made it (workers inherit the variable)
        shutil.rmtree(_XLA_CACHE, ignore_errors=True)


def _shared_path() -> pathlib.Path:
    return pathlib.Path(os.environ.get("TARL_SHARED_DIR", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    path = _shared_path()
    if not path.is_dir():
        msg = f"shared data directory {path} not found (set TARL_SHARED_DIR)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; CI must have it")
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def taubench_dir(shared_dir) -> pathlib.Path:
    path = shared_dir / "taubench"
    if not path.is_dir():
        pytest.fail(f"{path} missing inside the shared directory")
    return path


@pytest.fixture(scope="session")
def tok():
    """The project's tiny tokenizer (Qwen's special tokens)."""
    from tarl_jax.models.tokenizer import ChatTokenizer, tiny_tokenizer_dir
    return ChatTokenizer(tiny_tokenizer_dir())


@pytest.fixture(scope="session")
def model():
    """(config, params) of the micro preset with random weights (seed 0)."""
    import jax
    from tarl_jax.models import presets, qwen
    cfg = presets.get("micro")
    return cfg, jax.jit(lambda k: qwen.init_params(cfg, k))(jax.random.key(0))


@pytest.fixture(scope="module")
def micro_server(tok, model):
    """The OpenAI-compatible server over `model` (name "micro-test", batch 8, cache 1024,
    8-token chunks), serving from a background thread."""
    from tarl_jax import serve
    srv = serve.build(tok, *model, model_name="micro-test", batch=8, cache_len=1024, chunk=8,
                      port=0).start()
    yield srv
    srv.close()
