"""Ahead-of-time compilation of a run's programs for a TPU topology, on any host (no TPU, no
weights): does each program fit a chip's HBM, and how fast could it be.

The programs are the run's own jitted functions (rl/step.py's train step and scoring, the
warm start's step, sampler.py's prefill and decode, the audio encoder), lowered on
`jax.ShapeDtypeStruct` inputs carrying the shardings the run gives them, over the devices of a
topology that libtpu describes without a chip (`jax.experimental.topologies`). XLA's TPU compiler
then reports per-chip memory (`memory_analysis`) or refuses a program that does not fit.

Time is an estimate, labelled as one: FLOPs and HBM bytes counted analytically (XLA's
`cost_analysis` counts a loop body once, and every program here loops: layers under
scan_layers, microbatches, decode steps), divided by the chip's published peak bf16 FLOP/s and
HBM bandwidth (CHIPS); the larger is the roofline time, and model FLOPs over (roofline time x
peak) the MFU bound it implies.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from tarl_jax import sampler as sampler_lib
from tarl_jax import sharding
from tarl_jax.models import audio as audio_lib
from tarl_jax.models import bucket, omni, qwen
from tarl_jax.rl import batch as batch_lib
from tarl_jax.rl import step as step_lib

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures (Cloud TPU system architecture pages)."""
    name: str
    peak_flops: float        # bf16 FLOP/s
    hbm_bytes: float
    hbm_bw: float            # bytes/s
    dims: int                # torus dimensions of a slice
    cores_per_chip: int      # TensorCores an accelerator type's number counts (v4/v5p: 2)


CHIPS = {
    "v4": Chip("v4", 275e12, 32 * GiB, 1200e9, 3, 2),
    "v5e": Chip("v5e", 197e12, 16 * GiB, 819e9, 2, 1),
    "v5p": Chip("v5p", 459e12, 95 * GiB, 2765e9, 3, 2),
    "v6e": Chip("v6e", 918e12, 32 * GiB, 1640e9, 2, 1),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
    chip: Chip
    shape: tuple[int, ...]       # chips per torus dimension
    name: str

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def host_bounds(self) -> tuple[int, ...]:
        """Chips per host VM: 2x2x1 (v4, v5p), 2x2 (v5e, v6e), 2x4 for a one-host 8-chip v5e/v6e."""
        if self.chip.dims == 2:
            return self.shape if self.chips <= 8 else (2, 2)
        return tuple(min(b, s) for b, s in zip((2, 2, 1), self.shape))

    @property
    def hosts(self) -> int:
        return self.chips // math.prod(self.host_bounds)


def _torus(chips: int, dims: int) -> tuple[int, ...]:
    """The slice shape Cloud TPU gives an accelerator type of `chips` chips (2x2x1, 2x2x2,
    2x2x4, 2x4x4, 4x4x4, ... in 3D; 2x2, 2x4, 4x4, 4x8, ... in 2D)."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"{chips} chips: slices have a power-of-two chip count")
    shape = [1] * dims
    i = 0
    while math.prod(shape) < chips:
        shape[i % dims] *= 2
        i += 1
    return (2, 2, 1) if dims == 3 and chips == 4 else tuple(sorted(shape))


def parse_topology(name: str) -> Topology:
    """'v5p-64' (the accelerator type: v4 and v5p count TensorCores, two per chip; v5e and v6e
    count chips), or 'v5p:2x4x4' (chips per dimension)."""
    m = re.fullmatch(r"(v\d\w*?)(?:-(\d+)|:(\d+(?:x\d+)+))", name.strip())
    if not m:
        raise ValueError(f"--topology={name!r}: give an accelerator type (v5p-64, v4-16, "
                         f"v5e-16, v6e-16) or chips per dimension (v5p:2x4x4)")
    kind = _ALIASES.get(m.group(1), m.group(1))
    if kind not in CHIPS:
        raise ValueError(f"--topology={name!r}: chip {kind!r} unknown; known: {sorted(CHIPS)}")
    chip = CHIPS[kind]
    if m.group(2):
        cores = int(m.group(2))
        if cores % chip.cores_per_chip:
            raise ValueError(f"--topology={name!r}: {kind}-N counts TensorCores, "
                             f"{chip.cores_per_chip} a chip")
        shape = _torus(cores // chip.cores_per_chip, chip.dims)
    else:
        shape = tuple(int(x) for x in m.group(3).split("x"))
        if len(shape) != chip.dims:
            raise ValueError(f"--topology={name!r}: {kind} slices have {chip.dims} dimensions")
    return Topology(chip, shape, name)


def devices(topo: Topology) -> list:
    """The topology's devices, described by libtpu (no TPU needed; libtpu must be importable)."""
    from jax.experimental import topologies
    config = "megacore" if topo.chip.cores_per_chip == 2 else "default"
    bounds = topo.host_bounds
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=f"{topo.chip.name}:{'x'.join(map(str, topo.shape))}",
        chip_config_name=config, chips_per_host_bounds=bounds + (1,) * (3 - len(bounds)),
        num_slices=1)
    return list(desc.devices)


# ------------------------------------------------------------------------- analytic counts

def matmul_params(cfg: qwen.DecoderConfig) -> tuple[int, int]:
    """(weights every token multiplies through its layers, the vocabulary projection's)."""
    d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    per_layer = d * h * hd * 2 + d * kv * hd * 2 + 3 * d * cfg.intermediate_size
    return cfg.num_layers * per_layer, d * cfg.vocab_size


def train_flops(cfg: qwen.DecoderConfig, rows: int, t: int, scored: int,
                segment_ids=None) -> tuple[float, float]:
    """(model FLOPs, executed FLOPs) of one update on [rows, t]: 6 x weights x tokens, the
    vocabulary projection at `scored` positions a row, and causal attention (QK and PV over the
    pairs a query may see: half the square, or with the batch's `segment_ids` [rows, t] the pairs
    inside each packed segment). Executed counts what the program computes: the whole square
    without attn_chunk, `qwen.score_fraction` of it with, the block pairs `qwen._block_pairs`
    keeps with attn_sparse; plus what the backward pass recomputes (rematerialised dots count
    again; flash attention's backward recomputes QK only; elementwise ops are not counted)."""
    body, head = matmul_params(cfg)
    unit = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim      # fwd QK + PV, a (q, k) pair
    square = unit * t * t * rows
    need = square / 2 if segment_ids is None else unit * visible_pairs(segment_ids)
    attn = square * score_share(cfg, rows, t, segment_ids)
    sparse = _is_sparse(cfg, t)
    dense = 2 * body * rows * t + 2 * head * rows * scored
    model = 3 * (dense + need)
    fwd = dense + attn
    executed = 3 * fwd + {"full": fwd}.get(cfg.remat, 0.0)
    if attn < square and cfg.remat != "full":
        executed += attn / 2 if sparse else attn   # blocks recomputed in the backward pass
    return model, executed


def _is_sparse(cfg: qwen.DecoderConfig, t: int) -> bool:
    return cfg.attn_sparse and 0 < cfg.attn_chunk < t and t % cfg.attn_chunk == 0


def score_share(cfg: qwen.DecoderConfig, rows: int, t: int, segment_ids=None) -> float:
    """The share of the rows' [t, t] score squares the training attention computes: the block
    pairs `qwen._block_pairs` keeps with attn_sparse (segment_ids None: one segment a row),
    else `qwen.score_fraction`."""
    if not _is_sparse(cfg, t):
        return qwen.score_fraction(t, cfg.attn_chunk)
    seg = np.ones((rows, t), np.int32) if segment_ids is None else np.asarray(segment_ids)
    return float(np.asarray(qwen._block_pairs(seg, cfg.attn_chunk)).mean())


def visible_pairs(segment_ids) -> int:
    """(query, key) pairs causal attention inside packed segments lets see; padding (segment
    0) sees nothing."""
    total = 0
    for row in np.asarray(segment_ids):
        n = np.bincount(row[row > 0])
        total += int((n * (n + 1) // 2).sum())
    return total


def per_chip_bytes(tree) -> int:
    """Bytes of the largest shard of each leaf, summed: what one chip holds of `tree`."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += int(np.prod(shard)) * jnp.dtype(x.dtype).itemsize
    return total


# ------------------------------------------------------------------------- programs

@dataclasses.dataclass
class Program:
    name: str
    lower: Any                   # () -> jax.stages.Lowered
    flops: float                 # model FLOPs a call, all chips
    exec_flops: float            # executed FLOPs a call (remat), all chips
    hbm_bytes: float             # HBM bytes a call reads or writes, per chip (estimate)
    chips: int                   # chips the program runs on
    resident: int = 0            # bytes per chip other live arrays hold meanwhile (the state)
    note: str = ""


def _abstract(shapes, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


BATCH_DTYPES = dict(tokens=jnp.int32, positions=jnp.int32, segment_ids=jnp.int32,
                    targets=jnp.int32, loss_mask=jnp.bool_, advantages=jnp.float32,
                    logprobs=jnp.float32, ref_logprobs=jnp.float32, policy_index=jnp.int32,
                    token_rewards=jnp.float32, values=jnp.float32)


def batch_shapes(keys, rows: int, t: int, scored: int, hidden: int, audio_cfg=None) -> dict:
    """A packed batch's arrays as pack.py makes them. policy_index gets `scored` positions a
    row; a speech row `t // 4` audio embeddings (a bound: 25 a second of speech) or, when the
    encoder trains, their 2-s log-mel chunks."""
    out = {}
    for k in keys:
        if k == "policy_index":
            out[k] = jax.ShapeDtypeStruct((rows, scored), jnp.int32)
        elif k == "audio":
            out[k] = jax.ShapeDtypeStruct((rows, bucket(t // 4), hidden), jnp.float32)
        elif k == "mel":
            out[k] = jax.ShapeDtypeStruct((rows, bucket(t // 4 // 50), audio_cfg.num_mel_bins,
                                           audio_cfg.window), jnp.float32)
        elif k == "mel_lens":
            out[k] = jax.ShapeDtypeStruct((rows, bucket(t // 4 // 50)), jnp.int32)
        else:
            out[k] = jax.ShapeDtypeStruct((rows, t), BATCH_DTYPES[k])
    return out


class Plan:
    """Every program a run of `config` executes, on `devs` (a topology's devices).

    Args:
      config: the run's config (as tarl_jax.main gets it).
      model_cfg: the decoder's shape (with the config's dtype / remat / attn_chunk / scan).
      audio_cfg: the audio encoder's (speech configs), else None.
      devs: the devices (aot.devices(topology)); hosts: how many host processes share them.
    """

    def __init__(self, config, model_cfg, audio_cfg, devs, hosts: int):
        c = config
        self.c, self.cfg, self.audio_cfg, self.devs, self.hosts = c, model_cfg, audio_cfg, devs, hosts
        self.rules = sharding.rules_from_config(c.rules)
        self.mesh = sharding.make_mesh(dict(c.mesh), devs)
        self.ppo = c.rl.algo == "ppo"
        self.train_audio = bool(c.model.get("train_audio", False)) and audio_cfg is not None
        self.step_cfg = batch_lib.step_config(c, 0 if audio_cfg is not None else -1,
                                              audio_cfg if self.train_audio else None)
        self.optimizer = step_lib.make_optimizer(
            c.optim.lr, c.optim.warmup_steps, c.total_steps, c.optim.schedule, c.optim.clip_norm,
            c.optim.weight_decay, critic_lr=c.optim.critic_lr if self.ppo else None)
        speech = None if audio_cfg is None else "mel" if self.train_audio else "embeddings"
        self.keys = batch_lib.batch_keys(self.ppo, speech)
        self.state_sh = step_lib.state_shardings(model_cfg, self.optimizer, self.ppo, self.mesh,
                                                 self.rules,
                                                 audio_cfg if self.train_audio else None)
        self.state = _abstract(jax.eval_shape(self._init_state), self.state_sh)

    def _init_state(self):
        params = {"policy": qwen.init_params(self.cfg, jax.random.key(0))}
        if self.train_audio:
            params["audio"] = nn.unbox(audio_lib.boxed_params(self.audio_cfg, jax.random.key(1)))
        if self.ppo:
            params["value"] = step_lib.value_head_params(self.cfg)
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "opt_state": self.optimizer.init(params)}

    # -- what stays on a chip -------------------------------------------------------------
    def state_bytes(self) -> int:
        """The train state's bytes on one chip (plus the KL anchor's params when rl.kl_coef)."""
        extra = (per_chip_bytes(step_lib.acting_params(self.state["params"]))
                 if self.c.rl.kl_coef else 0)
        return per_chip_bytes(self.state) + extra

    def _batch(self, keys, rows: int, t: int):
        scored = t   # a row all policy tokens: the bound the fit must hold for
        shapes = batch_shapes(keys, rows, t, scored, self.cfg.hidden_size, self.audio_cfg)
        return _abstract(shapes, {k: v for k, v in step_lib.batch_shardings(
            keys, self.mesh, self.rules).items() if k in shapes})

    def _rng(self):
        return jax.ShapeDtypeStruct((), jax.random.key(0).dtype,
                                    sharding=sharding.replicated(self.mesh))

    # -- the learner ------------------------------------------------------------------------
    def train_steps(self) -> list[Program]:
        c, out = self.c, []
        _, step = batch_lib.build_step(self.cfg, self.step_cfg, self.optimizer, self.mesh,
                                       self.rules, self.keys,
                                       self.audio_cfg if self.train_audio else None)
        for t in c.pack.seq_lens:
            for rows in c.pack.rows:
                batch = self._batch(self.keys, rows, t)
                model, executed = train_flops(self.cfg, rows, t, t)
                out.append(Program(
                    f"rl_step {rows}x{t}",
                    lambda b=batch: step.lower(self.state, b, self._rng()),
                    model, executed, 0.0, len(self.devs)))
        return out

    def warm_start(self) -> list[Program]:
        w = self.c.warmstart
        if not w.steps or w.get("init"):
            return []
        from tarl_jax import sft
        keys = batch_lib.batch_keys(audio="embeddings" if self.audio_cfg is not None else None)
        opt = step_lib.make_optimizer(w.lr, w.warmup_steps, w.steps, w.schedule, 1.0)
        sh, step = batch_lib.build_step(self.cfg, sft.step_config(self.step_cfg), opt, self.mesh,
                                        self.rules, keys)
        params = {"policy": qwen.init_params(self.cfg, jax.random.key(0))}
        state = _abstract(jax.eval_shape(lambda: {
            "step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt.init(params)}), sh)
        batch = self._batch(keys, w.batch_rows, w.seq_len)
        model, executed = train_flops(self.cfg, w.batch_rows, w.seq_len, w.seq_len)
        return [Program(f"warmstart_step {w.batch_rows}x{w.seq_len}",
                        lambda: step.lower(state, batch, self._rng()),
                        model, executed, 0.0, len(self.devs))]

    def score(self) -> list[Program]:
        """Reference log-probs (rl.kl_coef) and rollout-time values (PPO), largest bucket."""
        if not (self.c.rl.kl_coef or self.ppo):
            return []
        fn = step_lib.make_score_fn(self.cfg, self.step_cfg, self.mesh, self.state_sh["params"],
                                    self.keys, self.rules)
        rows, t = max(self.c.pack.rows), max(self.c.pack.seq_lens)
        batch = self._batch(self.keys, rows, t)
        model, _ = train_flops(self.cfg, rows, t, t)
        return [Program(f"score {rows}x{t}",
                        lambda: fn.lower(self.state["params"], batch),
                        model / 3, model / 3, 0.0, len(self.devs),
                        resident=self.state_bytes())]

    # -- the sampler --------------------------------------------------------------------------
    def sampler_placement(self):
        """(shardings of the policy params, of the decode state, chips, note), as the trainer
        places them (trainer.sampler_mesh): a copy of the policy on rollout.tensor of the first
        host's chips, cut by heads."""
        n = self.c.rollout.get("tensor", 1)
        host = [d for d in self.devs if d.process_index == 0]
        n = len(host) if n == -1 else n
        mesh = sharding.make_mesh({"tensor": n}, host[:n])
        params_sh, state_sh = sampler_lib.Sampler(self.cfg, None, mesh=mesh,
                                                  rules=self.rules).shardings()
        note = (f"rollouts: a copy of the policy on {n} chip(s) of each host, cut by heads "
                "(rollout.tensor)")
        return params_sh, state_sh, n, note

    def sampler(self) -> list[Program]:
        c, cfg = self.c, self.cfg
        r = c.rollout
        p_sh, state_sh, chips, note = self.sampler_placement()
        row_sh = state_sh.length
        params = _abstract(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                        self.state["params"]["policy"]), p_sh)
        weights = per_chip_bytes(params)
        body, head = matmul_params(cfg)
        s = r.cache_len
        out = []
        cap = r.get("max_rows", 0) or float("inf")     # rollout.max_rows: sampled in waves
        rollout_rows = min(math.ceil(r.tasks_per_step * r.samples_per_task / self.hosts), cap)
        eval_rows = min(math.ceil(c.world.eval_tasks * r.eval_samples / self.hosts), cap)
        for label, b in (("rollout", rollout_rows), ("eval", eval_rows)):
            state = _abstract(jax.eval_shape(lambda b=b: sampler_lib.init_state(cfg, b, s)),
                              state_sh)
            cache = per_chip_bytes(state.cache)
            attn_tok = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * s   # a full window
            model = qwen.Decoder(cfg)
            resident = self.state_bytes()
            w = min(bucket(s, 16), 1024)   # the largest block Sampler.append feeds (prefill_chunk)
            prefill_args = (params, state, jax.ShapeDtypeStruct((b, w), jnp.int32, sharding=row_sh),
                            jax.ShapeDtypeStruct((b,), jnp.int32, sharding=row_sh))
            out.append(Program(
                f"prefill[{label}] {b}x{w} of {s}",
                lambda a=prefill_args, m=model: sampler_lib._append_jit.lower(
                    m, *a, None, audio_token_id=-1),
                b * w * (2 * (body + head) + attn_tok), b * w * (2 * (body + head) + attn_tok),
                weights + cache, chips,
                resident=resident, note=note))
            steps = bucket(r.max_turn_tokens, 16)
            row = lambda dt: jax.ShapeDtypeStruct((b,), dt, sharding=row_sh)
            decode_args = (params, state, jax.ShapeDtypeStruct((b,), jax.random.key(0).dtype,
                                                               sharding=row_sh),
                           row(jnp.float32), row(jnp.float32), row(jnp.int32),
                           jax.ShapeDtypeStruct((b, 4), jnp.int32, sharding=row_sh),
                           row(jnp.int32), row(jnp.float32), -1)
            truncate = r.top_p < 1 or r.top_k > 0
            out.append(Program(
                f"decode[{label}] {b}x{steps} of {s}",
                lambda a=decode_args, m=model: sampler_lib._decode_jit.lower(
                    m, *a, steps=steps, truncate=truncate),
                steps * b * (2 * (body + head) + attn_tok), steps * b * (2 * (body + head) + attn_tok),
                steps * (weights + cache), chips,
                resident=resident, note=note))
        return out

    def audio_encoder(self) -> list[Program]:
        """A sampler round's batched encode of the new utterances (frozen encoder: one chip per
        host, as SpeechView holds it): 4 two-second chunks per rollout row."""
        if self.audio_cfg is None or self.train_audio:
            return []
        a = self.audio_cfg
        one = SingleDeviceSharding(self.devs[0])
        params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
                              jax.eval_shape(lambda: nn.unbox(audio_lib.boxed_params(
                                  a, jax.random.key(0)))))
        r = self.c.rollout
        rows = math.ceil(r.tasks_per_step * r.samples_per_task / self.hosts)
        chunks = bucket(4 * min(rows, r.get("max_rows", 0) or rows))   # a wave's utterances
        mel = jax.ShapeDtypeStruct((chunks, a.num_mel_bins, a.window), jnp.float32, sharding=one)
        lens = jax.ShapeDtypeStruct((chunks,), jnp.int32, sharding=one)
        frames = chunks * a.window // 2
        per_layer = 4 * a.d_model * a.d_model + 2 * a.d_model * a.ffn_dim
        flops = 2 * frames * (a.num_layers * per_layer + a.d_model * a.output_dim)
        return [Program(f"audio_encode {chunks} chunks",
                        lambda: omni.encode_stream.lower(a, params, mel, lens),
                        flops, flops, per_chip_bytes(params), 1,
                        resident=self.state_bytes())]

    def programs(self) -> list[Program]:
        return (self.train_steps() + self.warm_start() + self.score() + self.sampler()
                + self.audio_encoder())


# ------------------------------------------------------------------------- compile and report

@dataclasses.dataclass
class Result:
    program: Program
    fits: bool
    argument: int = 0
    output: int = 0
    alias: int = 0
    temp: int = 0
    code: int = 0
    needed: float = 0.0          # bytes a chip needs (when XLA refused: its own figure)
    error: str = ""
    collectives: list = dataclasses.field(default_factory=list)

    def row(self, chip: Chip) -> dict:
        p = self.program
        t_compute = p.exec_flops / p.chips / chip.peak_flops
        t_memory = p.hbm_bytes / chip.hbm_bw
        t = max(t_compute, t_memory)
        return {"program": p.name, "fits": self.fits, "chips": p.chips,
                "argument_gib": self.argument / GiB, "output_gib": (self.output - self.alias) / GiB,
                "temp_gib": self.temp / GiB, "code_gib": self.code / GiB,
                "resident_gib": p.resident / GiB, "total_gib": self.needed / GiB,
                "hbm_gib": chip.hbm_bytes / GiB, "tflop_per_chip": p.flops / p.chips / 1e12,
                "hbm_gb_per_chip": p.hbm_bytes / 1e9, "roofline_s": t,
                "bound": "compute" if t_compute >= t_memory else "memory",
                "mfu_bound": (p.flops / p.chips / chip.peak_flops) / t if t else 0.0,
                "note": p.note, "error": self.error, "collectives": self.collectives}


_COLLECTIVE = re.compile(r"= (\(?[a-z0-9]+\[[\d,]*\][^=]*?) (all-gather|all-reduce|reduce-scatter|"
                         r"all-to-all|collective-permute)(?:-start)?\(")
_ARRAY = re.compile(r"([a-z]+\d*)\[([\d,]*)\]")
_OP_NAME = re.compile(r'op_name="([^"]+)"')


def collectives(hlo: str) -> list[dict]:
    """Every collective of the optimised HLO's text: {kind, shape, bytes (of its result), op (the
    jax operation it serves, from the HLO metadata)}. A loop body (scanned layers, microbatches,
    decode steps) appears once: multiply by its trip count for a call."""
    out = []
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if not m:
            continue
        shapes, kind = m.groups()
        size = 0
        for dtype, dims in _ARRAY.findall(shapes):
            n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
            size += n * (1 if dtype in ("pred", "s8", "u8") else
                         int(re.sub(r"\D", "", dtype) or 32) // 8)
        op = _OP_NAME.search(line)
        out.append({"kind": kind, "shape": shapes.split("{")[0].strip("( "), "bytes": size,
                    "op": op.group(1) if op else ""})
    return out


def collective_totals(ops: list[dict]) -> dict[str, list]:
    """{kind: [ops, bytes]}."""
    out: dict[str, list] = {}
    for o in ops:
        got = out.setdefault(o["kind"], [0, 0])
        got[0] += 1
        got[1] += o["bytes"]
    return out


_OOM = re.compile(r"(?:required for HLO temporaries|Used) \(?([\d.]+)([KMGT])\)?.*?"
                  r"(?:exceeds available HBM|of) \(?([\d.]+)([KMGT])", re.S)


def compile_one(p: Program, chip: Chip) -> Result:
    """Compile p; a program XLA refuses for memory is a Result with fits=False and its figure."""
    try:
        compiled = p.lower().compile()
    except Exception as e:   # XLA's RESOURCE_EXHAUSTED arrives as a JaxRuntimeError
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
            raise
        m = _OOM.search(text)
        scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
        needed = float(m.group(1)) * scale[m.group(2)] if m else float("nan")
        return Result(p, False, needed=needed + p.resident,
                      error=text.split("\n")[0][:300])
    mem = compiled.memory_analysis()
    r = Result(p, True, mem.argument_size_in_bytes, mem.output_size_in_bytes,
               mem.alias_size_in_bytes, mem.temp_size_in_bytes, mem.generated_code_size_in_bytes)
    r.needed = r.argument + r.output - r.alias + r.temp + r.code + p.resident
    r.collectives = collectives(compiled.as_text())
    r.fits = r.needed <= chip.hbm_bytes
    return r


def advice(r: Result) -> str:
    """Which knob helps the program that does not fit."""
    name = r.program.name
    if name.startswith(("rl_step", "warmstart", "score")):
        return ("more chips on fsdp (--config.mesh.fsdp), rl.microbatches (rows per microbatch a "
                "multiple of data x fsdp), model.remat=full, a smaller model.attn_chunk, or "
                "smaller pack.rows / pack.seq_lens")
    if name.startswith(("prefill", "decode")):
        return ("rollout.max_rows (episodes a host samples at once, in waves), or "
                "rollout.cache_len")
    return "fewer rollout rows per host"


def checks(config, topo: Topology) -> list[str]:
    """What the run would refuse on this topology before any program runs."""
    out, hosts = [], topo.hosts
    r = config.rollout
    if r.tasks_per_step % hosts:
        out.append(f"rollout.tasks_per_step={r.tasks_per_step} does not split over {hosts} hosts")
    mesh = sharding.mesh_shape(dict(config.mesh), topo.chips)
    lanes = mesh[0] * mesh[1]
    for rows in config.pack.rows:
        per_micro = rows // max(config.rl.microbatches, 1)
        if rows % max(config.rl.microbatches, 1) or per_micro % lanes:
            out.append(f"pack.rows {rows} / rl.microbatches {config.rl.microbatches} = "
                       f"{rows / config.rl.microbatches:g} rows a microbatch: not a multiple of "
                       f"data x fsdp = {lanes} (chips would idle or hold rows twice)")
    return out
