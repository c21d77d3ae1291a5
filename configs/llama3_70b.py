"""Llama-3-70B at its real size: 70.6B parameters, the shapes of Meta's model (vocabulary
128,256, untied head, GQA with 8 key/value heads, RoPE theta 500,000), trained at Llama 3's
pretraining context of 8,192 tokens in bfloat16 with every block rematerialised.

A recipe for a TPU pod or a GPU cluster: it trains on the embedded CPython docs by default so
that it runs as it stands; give it real data and Llama 3's tokenizer for real work
(`--config.data.source=prepared:DIR --config.data.tokenizer=hf:meta-llama/Meta-Llama-3-70B`).
`python -m jtrain.plan` says before a run whether and how it fits (benchmarks/results/
plan_llama3.txt holds the plans for these topologies). Those are estimates: compiled
for v5p:4x8x8 (jtrain.aot, benchmarks/results/aot_llama3.txt) XLA needs more than the
chip's memory, because its attention keeps several float32 [rows, heads, 8192, 8192]
arrays live; check with `--aot` before renting the topology:

    v5p-512 (256 chips, 4x8x8), FSDP over every chip, one sequence per chip:
        python -m jtrain.plan --config=llama3_70b --accelerator=v5p --chips=256
    64x H100 80GB (8 nodes), FSDP over the 64 GPUs, 4 micro-batches of one sequence per GPU:
        python -m jtrain.plan --config=llama3_70b --accelerator=h100 --chips=64 \\
            --config.train.microbatches=4
"""

import ml_collections

from jtrain.configs import llama3_8b


def get_config() -> ml_collections.ConfigDict:
    """Returns the Llama-3-70B recipe."""
    c = llama3_8b.get_config()
    m = c.model
    m.d_model = 8192
    m.n_layers = 80
    m.n_heads = 64
    m.n_kv_heads = 8
    m.head_dim = 128
    m.d_ff = 28_672
    c.train.batch_size = 256  # 2M tokens per step
    c.optimizer.lr = 1.5e-4  # Llama 3 70B's peak
    return c
