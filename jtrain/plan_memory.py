"""Memory per device of a training step, for `jtrain.plan`, without allocating anything.

The state's part is exact: `jax.eval_shape` of the run's own initialiser (the model, LoRA, the
task's frozen models and the optimizer's `init`) gives every array, and jtrain's mesh rules over
an abstract mesh give its NamedSharding, whose shard shape is what one device holds. Gradients
are the trained parameters' shapes and shardings (twice with micro-batches: the accumulator and
the micro-batch's own).

Activations are a formula (`activation_bytes`), after Korthikanti et al., "Reducing Activation
Recomputation in Large Transformer Models" (2022), section 4: the tensors autodiff keeps per
block, adapted to jtrain's block (no dropout, GQA, a SwiGLU or plain MLP, XLA's float32 softmax
or cuDNN's fused attention) and to each `model.remat` policy.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType

from jtrain import mesh as mesh_lib
from jtrain import optim
from jtrain.experiment import _Parts, _state_initializer
from jtrain.models import lora
from jtrain.models.transformer import DTYPES, TransformerConfig
from jtrain.state import TrainState

BATCH_ARRAYS = 5  # inputs, targets, loss_weight, positions, segment_ids: int32/float32 [B, L]


def abstract_state(config, task) -> TrainState:
    """The TrainState's shapes and dtypes, with logical names, as Experiment builds it."""
    tx, _ = optim.make_optimizer(config.optimizer, config.schedule, config.train.steps)
    parts = _Parts(task, lora.LoRAConfig.from_config(config.model))
    init = _state_initializer(parts, tx)
    return jax.eval_shape(init, jax.random.key(0), parts.no_sources())


def abstract_mesh(sizes: tuple[int, ...]) -> AbstractMesh:
    """A (data, fsdp, tensor) mesh of these sizes with no devices behind it."""
    axis_types = (AxisType.Auto,) * len(mesh_lib.MESH_AXES)
    return AbstractMesh(sizes, mesh_lib.MESH_AXES, axis_types=axis_types)


def count(tree) -> int:
    """How many values the arrays of a pytree hold."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _device_bytes(tree, shardings) -> int:
    leaves = jax.tree.leaves(tree)
    specs = jax.tree.leaves(shardings)
    return sum(
        math.prod(s.shard_shape(tuple(a.shape))) * np.dtype(a.dtype).itemsize
        for a, s in zip(leaves, specs, strict=True)
    )


def state_bytes(state: TrainState, sizes: tuple[int, ...], rules, microbatches: int) -> dict:
    """Bytes per device of parameters (trained and frozen), gradients and optimizer state.

    ValueError (from jtrain.mesh) when a mesh axis does not divide a sharded dimension.
    """
    shardings = mesh_lib.tree_shardings(state, abstract_mesh(sizes), rules)
    trained = _device_bytes(state.params, shardings.params)
    return {
        "parameters": trained + _device_bytes(state.frozen, shardings.frozen),
        "gradients": trained * (2 if microbatches > 1 else 1),
        "optimizer_state": _device_bytes(state.opt_state, shardings.opt_state),
    }


@dataclasses.dataclass(frozen=True)
class Split:
    """How one device's share of a step's activations is cut: rows, and the tensor axis."""

    rows: float  # sequences per device per micro-batch
    heads: int  # ways the query heads are split
    kv_heads: int
    mlp: int
    vocab: int
    fsdp: int  # ways each weight is split along "embed" (gathered for its layer's matmuls)

    @classmethod
    def of(cls, config, sizes: tuple[int, ...], rules, microbatches: int) -> Split:
        shape = dict(zip(mesh_lib.MESH_AXES, sizes, strict=True))

        def ways(logical: str) -> int:
            return math.prod(shape[a] for a in rules.get(logical, ()))

        rows = config.train.batch_size / microbatches / ways("batch")
        return cls(rows, ways("heads"), ways("kv_heads"), ways("mlp"), ways("vocab"), ways("embed"))


# Measured on XLA's TPU compiler (benchmarks/plan_calibration.py compiles small variants of
# the Llama recipe; tests/golden/plan_memory.json holds XLA's figures). XLA's attention forms
# [rows, heads, L, L] scores: with remat=none each block keeps, per score, its float32 softmax
# and logits and the compute-dtype probabilities (~10 bytes); the backward pass of one block
# then needs ~7 bytes per score on top (the probabilities' gradient and the softmax's).
SCORE_BYTES_KEPT = 10
SCORE_BYTES_BACKWARD = 7
# Under FSDP XLA gathers every layer's weights in the compute dtype and holds their float32
# gradient whole before reduce-scattering it, and it does not free them layer by layer: the
# recipes' compiles (8B on 64 chips, 70B on 256) hold ~e + 4 bytes per layer parameter through
# the step (small models at fsdp 4 hold ~e; the plan keeps the larger figure).
GRADIENT_BYTES = 4


def activation_bytes(cfg: TransformerConfig, seq_len: int, split: Split, kernel: str) -> dict:
    """Bytes per device of activations (by remat policy) and of the weights FSDP gathers, for
    one micro-batch of a decoder's LM step; the terms are XLA's, measured (see above).

    T = rows x L tokens on the device, e bytes per compute-dtype value, S = rows x heads x L^2
    attention scores. A block's tensors for its backward pass (after Korthikanti et al. 2022,
    section 4, adapted to jtrain's block: no dropout, GQA, SwiGLU) are both norms' inputs and
    outputs (4D), q, k, v and the attention output (2 HK + 2 GK), the MLP's gate, up,
    activation and product (4F; 2F ungated): T e (4D + 2HK + 2GK + 4F), plus the scores'.
    Kept across the layer loop: remat=none every block's tensors and scores (S x 10 bytes);
    full only each block's input (the scan's carry, T D e); dots, as XLA compiles it, the input
    and nearly all the block's tensors but its scores (the projections' outputs and what is
    computed from them). The peak adds, for the block being differentiated, its recomputed
    tensors and the scores' gradients (S x 7 bytes), or, when larger, the LM head's: one chunk of
    model.loss_chunk positions (the whole row without) of logits in e and float32 bytes and
    their float32 gradient, with the head's gathered weights; the two never live at once.
    cuDNN keeps a float32 log-sum-exp per query and head instead of scores. The final hidden
    states (T D e) and packed rows' [B, 1, L, L] boolean mask come on top.
    """
    e = np.dtype(DTYPES[cfg.dtype]).itemsize
    tokens = split.rows * seq_len
    d, f = cfg.d_model, cfg.d_ff / split.mlp
    q = cfg.n_heads * cfg.head_dim / split.heads
    kv = cfg.n_kv_heads * cfg.head_dim / split.kv_heads
    mlp_outputs = 4 if cfg.mlp_gated else 2
    scores = split.rows * cfg.n_heads / split.heads * seq_len**2
    if kernel == "cudnn":
        kept_scores = backward_scores = split.rows * cfg.n_heads / split.heads * seq_len * 4
    else:
        kept_scores, backward_scores = scores * SCORE_BYTES_KEPT, scores * SCORE_BYTES_BACKWARD
    block = tokens * e * (4 * d + 2 * q + 2 * kv + mlp_outputs * f)
    carry = tokens * d * e  # a block's input, the scan's carry
    kept, recomputed = {
        "none": (block + kept_scores, 0),
        "full": (carry, block),
        "dots": (carry + block, block),
    }[cfg.remat]
    chunk = cfg.loss_chunk if 0 < cfg.loss_chunk < seq_len else seq_len
    vocab = cfg.vocab_size / split.vocab
    head = split.rows * chunk * vocab * (e + 4 + 4)
    if split.fsdp > 1:  # the head's gathered weights and their gradient, while it runs
        head += d * vocab * (e + GRADIENT_BYTES)
    peak = max(recomputed + backward_scores, head)
    mask = split.rows * seq_len**2  # packed rows' [B, 1, L, L] document mask, in bytes
    activations = cfg.n_layers * kept + carry + peak + mask
    return {"activations": int(activations), "gathered_weights": _gathered(cfg, split, e)}


def _gathered(cfg: TransformerConfig, split: Split, e: int) -> int:
    """What XLA holds of FSDP's gathered layer weights: every layer's, whole along "embed", in
    the compute dtype with their float32 gradient (see GRADIENT_BYTES). Zero without FSDP: the
    weights are then resident, counted as parameters."""
    if split.fsdp == 1:
        return 0
    d, k = cfg.d_model, cfg.head_dim
    attention = d * k * (cfg.n_heads / split.heads * 2 + cfg.n_kv_heads / split.kv_heads * 2)
    mlp = d * cfg.d_ff / split.mlp * (3 if cfg.mlp_gated else 2)
    return int(cfg.n_layers * (attention + mlp) * (e + GRADIENT_BYTES))


def batch_bytes(config, sizes: tuple[int, ...], rules) -> int:
    """The step's whole batch on one device: every micro-batch arrives at once."""
    rows = Split.of(config, sizes, rules, microbatches=1).rows
    return int(rows * config.train.seq_len * 4 * BATCH_ARRAYS)


def frozen_parts(state: TrainState) -> dict[str, int]:
    """Values per frozen part: the trained model's frozen base, each frozen model."""
    return {name: count(part) for name, part in (state.frozen or {}).items() if count(part)}


def frozen_dtypes(state: TrainState) -> dict[str, str]:
    """The storage dtypes of each frozen part (a LoRA base in bfloat16 or int8)."""
    out = {}
    for name, part in (state.frozen or {}).items():
        dtypes = sorted({str(leaf.dtype) for leaf in jax.tree.leaves(part)})
        if dtypes:
            out[name] = ",".join(dtypes)
    return out
