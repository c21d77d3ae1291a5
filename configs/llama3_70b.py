"""Llama-3-70B at its real size: 70.6B parameters, the shapes of Meta's model (vocabulary
128,256, untied head, GQA with 8 key/value heads, RoPE theta 500,000), trained at Llama 3's
pretraining context of 8,192 tokens in bfloat16 with every block rematerialised.

A recipe for a TPU pod or a GPU cluster: it trains on the embedded CPython docs by default so
that it runs as it stands; give it real data and Llama 3's tokenizer for real work
(`--config.data.source=prepared:DIR --config.data.tokenizer=hf:meta-llama/Meta-Llama-3-70B`).
Under FSDP alone XLA holds every layer's gathered weights and their float32 gradient through
the step (~6 bytes per parameter, 380 GiB per chip for the 70B), so the recipe splits each
layer 8 ways by tensor parallelism and FSDP over the rest, and each chip holds one sequence at
a time (train.microbatches). `python -m jtrain.plan` estimates, and a compile for the topology
checks (benchmarks/results/plan_llama3.txt, aot_llama3.txt):

    v5p-512 (256 chips, 4x8x8), FSDP 32 x tensor 8, 8 micro-batches of one sequence per chip:
        python -m jtrain.plan --config=llama3_70b --accelerator=v5p --chips=256 --aot=v5p:4x8x8
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
    c.train.microbatches = 8  # 256 rows over fsdp 32: one sequence per chip at a time
    c.mesh.tensor = 8  # heads and MLP split 8 ways within a layer (64 and 8 heads divide)
    c.optimizer.lr = 1.5e-4  # Llama 3 70B's peak
    return c
