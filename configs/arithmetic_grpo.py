"""Arithmetic, stage 4: GRPO with an exact-match reward, from the DPO model.

Each step samples 8 answers to each of 16 training questions from the current weights, rewards
the right ones, and moves the policy towards the answers that beat their group's mean. With
--config.grpo.dynamic_sampling=True, questions whose 8 answers are all right (or all wrong)
are replaced by fresh ones, so every update has signal. Validation and test events report
`rewards/exact_match/mean`: the exact match of greedy answers to held-out questions.

    python -m jtrain.main --config=configs/arithmetic_grpo.py --workdir=runs/arith_grpo \\
        --config.model.init_from=runs/arith_dpo
"""

import ml_collections

from jtrain.configs import arithmetic_sft


def get_config() -> ml_collections.ConfigDict:
    """Returns GRPO of the arithmetic model with an exact-match reward."""
    c = arithmetic_sft.get_config()
    c.task = "grpo"
    c.data.source = "arithmetic_prompts"  # {"prompt": [user message], "answer": "45"}
    c.model.init_from = "runs/arith/dpo"
    c.grpo = ml_collections.ConfigDict()
    c.grpo.rewards = "exact_match"  # the answer field, after stripping
    c.grpo.num_generations = 8
    c.grpo.max_completion_length = 8
    c.grpo.temperature = 1.0
    c.grpo.top_k = 0
    c.grpo.top_p = 1.0
    c.grpo.scale_rewards = "group"
    c.grpo.loss = "dapo"
    c.grpo.epsilon = 0.2
    c.grpo.epsilon_high = 0.28  # DAPO's clip-higher
    c.grpo.iterations = 1
    c.grpo.beta = 0.0
    c.grpo.reference = ""
    c.grpo.mask_truncated = True
    c.grpo.dynamic_sampling = False
    c.grpo.dynamic_sampling_rounds = 4
    c.train.seq_len = 48
    c.train.batch_size = 128  # 16 questions x 8 answers
    c.train.steps = 100
    # Low: most groups carry little signal, and Adam's first steps move every weight by
    # about lr whatever the gradient's size (3e-4 undid the DPO model in one step).
    c.optimizer.lr = 2e-5
    c.optimizer.weight_decay = 0.0  # as TRL: steps without signal must not move the weights
    c.schedule.warmup_steps = 10
    c.eval.every_steps = 50
    c.eval.generate.examples = 500  # greedy answers to the 500 validation questions
    c.eval.sample_tokens = 0
    c.checkpoint.every_steps = 50
    return c
