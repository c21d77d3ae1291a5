"""Arithmetic, stage 3: a reward model that scores right answers above the model's mistakes.

Trained on the same pairs as DPO, from the SFT model's trunk (the scalar head starts fresh);
its validation and test events report `accuracy`, the fraction of held-out pairs it ranks
right, and `margin`. `jtrain.export` writes it as a Hugging Face ...ForSequenceClassification,
and GRPO can use it as a reward (grpo.rewards="reward_model:runs/arith/reward"):

    python -m jtrain.main --config=configs/arithmetic_reward.py --workdir=runs/arith_reward \\
        --config.model.init_from=runs/arith_sft --config.data.source=files:runs/pairs.jsonl
"""

import ml_collections

from jtrain.configs import arithmetic_dpo


def get_config() -> ml_collections.ConfigDict:
    """Returns a Bradley-Terry reward model on the arithmetic pairs."""
    c = arithmetic_dpo.get_config()
    c.task = "reward"
    del c.dpo
    c.reward = ml_collections.ConfigDict()
    c.reward.center_coefficient = 0.01  # keeps scores near zero (TRL's recommended value)
    c.train.steps = 300
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 0.1
    return c
