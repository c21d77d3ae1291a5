"""Llama-3-8B at its real size: 8.03B parameters, the shapes of Meta's model (vocabulary 128,256,
untied head, GQA with 8 key/value heads, RoPE theta 500,000), trained at Llama 3's pretraining
context of 8,192 tokens in bfloat16 with every block rematerialised.

A recipe for accelerators, not for a CPU: it trains on the embedded CPython docs by default so
that it runs as it stands; give it real data and Llama 3's tokenizer for real work
(`--config.data.source=prepared:DIR --config.data.tokenizer=hf:meta-llama/Meta-Llama-3-8B`).
`python -m jtrain.plan` says before a run whether and how it fits (benchmarks/results/
plan_llama3.txt holds the plans for these topologies). Those are estimates: compiled
for v5p:4x4x4 (jtrain.aot, benchmarks/results/aot_llama3.txt) XLA needs more than the
chip's memory, because its attention keeps several float32 [rows, heads, 8192, 8192]
arrays live; check with `--aot` before renting the topology:

    v5p-128 (64 chips, 4x4x4), FSDP over every chip, 4 sequences per chip:
        python -m jtrain.plan --config=llama3_8b --accelerator=v5p --chips=64
    8x H100 80GB (one node), FSDP over the 8 GPUs, 8 micro-batches of 4 sequences per GPU:
        python -m jtrain.plan --config=llama3_8b --accelerator=h100 --chips=8 \\
            --config.train.microbatches=8

The same --config flags train: `python -m jtrain.main --config=llama3_8b --workdir=DIR ...`.
"""

import ml_collections

from jtrain.configs import default


def get_config() -> ml_collections.ConfigDict:
    """Returns the Llama-3-8B recipe."""
    c = default.get_config()
    m = c.model
    m.vocab_size = 128_256  # Llama 3's tokenizer
    m.d_model = 4096
    m.n_layers = 32
    m.n_heads = 32
    m.n_kv_heads = 8
    m.head_dim = 128
    m.d_ff = 14_336
    m.rope_theta = 500_000.0
    m.tie_embeddings = False
    m.dtype = "bfloat16"  # compute; parameters and optimizer state stay float32
    m.remat = "full"  # keep only each block's input; recompute the rest in the backward pass
    m.attention = "auto"  # cuDNN's fused attention on NVIDIA GPUs, XLA's elsewhere
    # The [tokens, 128256] float32 logits of a whole row are 4 GiB: compute head and loss
    # 1,024 positions at a time.
    m.loss_chunk = 1024
    c.train.seq_len = 8192  # Llama 3's pretraining context
    c.train.batch_size = 256  # 2M tokens per step
    c.train.steps = 1000
    c.train.log_every = 10
    c.eval.every_steps = 250
    c.eval.steps = 4
    c.checkpoint.every_steps = 250
    c.optimizer.lr = 3e-4  # Llama 3 8B's peak
    c.optimizer.weight_decay = 0.1
    c.schedule.warmup_steps = 100
    # FSDP over every chip: parameters, gradients and Adam's moments are split, and each chip
    # trains on its own rows; tensor parallelism pays only when the batch per chip runs out.
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    return c
