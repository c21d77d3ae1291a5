"""Llama-3-8B at its real size: 8.03B parameters, the shapes of Meta's model (vocabulary 128,256,
untied head, GQA with 8 key/value heads, RoPE theta 500,000), trained at Llama 3's pretraining
context of 8,192 tokens in bfloat16 with every block rematerialised.

A recipe for accelerators, not for a CPU: it trains on the embedded CPython docs by default so
that it runs as it stands; give it real data and Llama 3's tokenizer for real work
(`--config.data.source=prepared:DIR --config.data.tokenizer=hf:meta-llama/Meta-Llama-3-8B`).
Each chip holds one sequence at a time (train.microbatches), since XLA's attention keeps
float32 [rows, heads, 8192, 8192] scores while a block is differentiated (~7 bytes per score,
15 GiB per sequence): `python -m jtrain.plan` and a compile for the topology agree that it fits
(benchmarks/results/plan_llama3.txt, aot_llama3.txt):

    v5p-128 (64 chips, 4x4x4), FSDP over every chip, 4 micro-batches of one sequence per chip
    (plan 58.7 GiB per chip; XLA's compile 68.3 GiB of 95.7):
        python -m jtrain.plan --config=llama3_8b --accelerator=v5p --chips=64 --aot=v5p:4x4x4
    8x H100 80GB (one node): the plan suggests FSDP 4 x tensor 2 and 32 micro-batches
    (45 GiB per GPU; an estimate, with XLA's TPU behaviour assumed, not compiled for a GPU):
        python -m jtrain.plan --config=llama3_8b --accelerator=h100 --chips=8 \\
            --config.mesh.fsdp=4 --config.mesh.tensor=2 --config.train.microbatches=32

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
    # One sequence per chip at a time on 64 chips (4 on each): see the docstring.
    c.train.microbatches = 4
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
