"""Checkpoint I/O: sliced reads, export to transformers, errors that name the tensor, GGUF, presets."""
import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tarl_jax.models import hf, presets, qwen
from tests import hf_models


@pytest.mark.parametrize("kind,shape", [("heads_in", (6, 4, 3)), ("heads_out", (4, 3, 6)),
                                        ("T", (6, 5)), ("heads_bias", (4, 3)), ("id", (7,))])
def test_read_slice_reads_only_the_rows_it_needs(kind, shape):
    lay = hf.layout(kind, shape)
    target = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    source = lay.to_hf(target)
    asked = []

    def get(index):
        asked.append(index)
        return source[index]

    last = (slice(None),) * (len(shape) - 1) + (slice(1, 3),)  # also an inner factor (head_dim)
    np.testing.assert_array_equal(hf.read_slice(get, lay, last), target[last])
    first = (slice(1, 3),) + (slice(None),) * (len(shape) - 1)
    np.testing.assert_array_equal(hf.read_slice(get, lay, first), target[first])
    read = np.zeros(source.shape, bool)
    read[asked[-1]] = True
    assert read.sum() < source.size, "a shard of the first dim must not read the whole tensor"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """kind -> (transformers model, saved directory)."""
    out = {}
    for kind in ("qwen2", "qwen3", "llama"):
        model = hf_models.build(kind, seed=1)
        path = tmp_path_factory.mktemp(kind)
        model.save_pretrained(path)
        out[kind] = model, path
    return out


@pytest.mark.parametrize("kind,scan", [("qwen3", False), ("qwen2", True)])
def test_export_loads_in_transformers_with_same_logits(models, tmp_path, kind, scan):
    import transformers
    model, path = models[kind]
    cfg, params = hf.load_hf(path, overrides=dict(scan_layers=scan))
    # qwen2 (stacked params) is written in several shards, through the index file.
    hf.export_hf(params, cfg, tmp_path, max_shard_bytes=40_000 if scan else 1 << 30)
    assert (tmp_path / "model.safetensors.index.json").exists() == scan
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded) is type(model)
    np.testing.assert_array_equal(hf_models.torch_logits(reloaded), hf_models.torch_logits(model))


def _edited_copy(src, dst, edit):
    """A copy of checkpoint `src` whose tensors dict went through `edit`."""
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_unsupported_architecture_is_named(models, tmp_path):
    config = json.loads((models["llama"][1] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, model_type="gpt2")))
    with pytest.raises(ValueError, match="unsupported architecture model_type='gpt2'"):
        hf.load_hf(tmp_path)


def test_missing_tensor_is_named(models, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    _edited_copy(models["llama"][1], tmp_path, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=f"missing tensor '{name}'"):
        hf.load_hf(tmp_path)


def test_misshaped_tensor_is_named(models, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    _edited_copy(models["qwen3"][1], tmp_path, lambda t: t.update({name: t[name][:-1]}))
    with pytest.raises(ValueError, match=rf"tensor '{name}' has shape \(63, 64\), this config "
                                         r"expects \(64, 64\) \(param layers_0/attn/k\)"):
        hf.load_hf(tmp_path)


def test_unused_tensor_is_named(models, tmp_path):
    # A bias the llama config does not declare would otherwise be silently dropped.
    name = "model.layers.0.self_attn.q_proj.bias"
    _edited_copy(models["llama"][1], tmp_path, lambda t: t.update({name: np.ones(64, np.float32)}))
    with pytest.raises(ValueError, match=f"unexpected tensor '{name}'"):
        hf.load_hf(tmp_path)


def test_dtype_sets_storage_dtype(models):
    cfg, params = hf.load_hf(models["qwen3"][1], dtype="bfloat16")
    assert cfg.param_dtype == "bfloat16"
    assert {x.dtype.name for x in jax.tree.leaves(params)} == {"bfloat16"}


def _non_embedding_params(cfg):
    cfg = dataclasses.replace(cfg, scan_layers=True)  # one traced layer: quick
    total = qwen.num_params(jax.tree.leaves(qwen.boxed_params(cfg)))
    return total - cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_embeddings else 2)


def test_qwen3_presets_match_published_sizes():
    # Qwen3 model cards: 1.7B has 1.4B non-embedding parameters, 8B has 6.95B.
    assert round(_non_embedding_params(presets.get("qwen3-1.7b")) / 1e9, 1) == 1.4
    assert round(_non_embedding_params(presets.get("qwen3-8b")) / 1e9, 2) == 6.95


# ----------------------------------------------------------------------------- GGUF

def _write_gguf(model, path):
    """A float32 GGUF laid out as llama.cpp's converter does (names, metadata, llama q/k order)."""
    import gguf
    c, arch = model.config, model.config.model_type
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(path, arch)
    w.add_vocab_size(c.vocab_size)
    w.add_context_length(512)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    names = {hf_t.format(i=i): gguf_t.format(i=i)
             for _, hf_t, gguf_t, _ in hf.TABLE for i in range(c.num_hidden_layers)}
    for name, x in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # tied: llama.cpp writes no output.weight
        x = x.numpy()
        heads = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}.get(name.split(".")[-2])
        if arch == "llama" and heads:  # llama.cpp stores each q/k head's rotary pairs interleaved
            x = x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
        w.add_tensor(names[name], x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama"])
def test_tiny_gguf_matches_transformers(tmp_path, kind):
    # transformers maps the qwen3 GGUF without attention.key_length, i.e. with head_dim 128.
    model = hf_models.build(kind, **({"head_dim": 128} if kind == "qwen3" else {}))
    _write_gguf(model, tmp_path / "m.gguf")
    ref = hf_models.torch_logits(model)
    # transformers reading our file validates it against llama.cpp's conventions ...
    np.testing.assert_allclose(_transformers_gguf_logits(tmp_path / "m.gguf"), ref, atol=1e-6)
    # ... and we read it back to the same model.
    cfg, params = hf.load_gguf(tmp_path / "m.gguf")
    assert cfg == qwen.DecoderConfig.from_hf(model.config.to_dict())
    assert np.abs(hf_models.jax_logits(cfg, params) - ref).max() < 1e-4


@pytest.fixture(scope="module")
def smollm2_gguf():
    try:
        return hf.smollm2_gguf_path()
    except FileNotFoundError as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(str(e))
        pytest.skip(str(e))


def _transformers_gguf_logits(path, ids=hf_models.TOKENS):
    """transformers' own GGUF reading (name mapping, q/k unpermute, gguf's dequantisation).

    `from_pretrained(gguf_file=...)` would do the same but insists on `accelerate`, which this
    project does not otherwise need.
    """
    import torch
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == (["lm_head.weight"] if config.tie_word_embeddings else []) and not unexpected
    model.tie_weights()
    return hf_models.torch_logits(model.eval(), ids)


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm2_gguf):
    import transformers
    cfg, params = hf.load_gguf(smollm2_gguf)
    assert cfg == presets.get("smollm2-135m")
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    text = ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
            "<|im_start|>assistant\nThe capital of France is Paris, a city on the Seine.")
    ids = np.asarray([tok(text).input_ids])
    ours, ref = hf_models.jax_logits(cfg, params, ids), _transformers_gguf_logits(smollm2_gguf, ids)
    # Both dequantise with gguf's own code, so the weights are equal; what is left is float32
    # summation order over 30 layers (measured 9.7e-5 on logits up to 36.5).
    assert np.abs(ours - ref).max() < 1e-3
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
