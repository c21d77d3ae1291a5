"""LoRA fine-tuning: the supervised fine-tuning recipe (configs/sft.py) with low-rank adapters
on every projection of a frozen base, instead of training every weight.

Only the adapters train and are checkpointed (a few percent of the parameters and of the
optimizer state); on resume the base is read from model.init_from again:

    python -m jtrain.main --config=configs/default.py --workdir=runs/default
    python -m jtrain.main --config=configs/lora.py --workdir=runs/lora \\
        --config.model.init_from=runs/default

Without init_from the adapters train on a randomly initialised base (a smoke test only).
`--config.model.lora.base_dtype=int8` stores the frozen base in int8 (QLoRA-style).
"""

import ml_collections

from jtrain.configs import sft


def get_config() -> ml_collections.ConfigDict:
    """Returns the SFT recipe with rank-8 adapters on a frozen base."""
    c = sft.get_config()
    c.model.init_from = ""  # the base to adapt: a jtrain workdir (runs/default) or hf:PATH
    c.model.lora.rank = 8
    c.model.lora.alpha = 16.0  # updates scaled by alpha / rank = 2
    c.model.lora.dropout = 0.05
    c.model.lora.targets = "all"  # q,k,v,o and gate,up,down: a small model needs them all
    # Adapters start at zero and hold few parameters: a higher lr than full fine-tuning's
    # 1e-3, and no weight decay, which would pull the update back toward the base.
    c.optimizer.lr = 3e-3
    c.optimizer.weight_decay = 0.0
    return c
