"""Arithmetic, stage 2: DPO on pairs whose rejected answers are the SFT model's own mistakes.

`examples/arithmetic_chain.py` samples the SFT model's answers to training questions with
`jtrain.generate`, and writes each wrong answer as a pair, the right answer chosen: the model
is taught to prefer the truth over exactly the errors it makes. The reference is the SFT model
(`model.init_from`, frozen, never checkpointed):

    python -m jtrain.main --config=configs/arithmetic_dpo.py --workdir=runs/arith_dpo \\
        --config.model.init_from=runs/arith_sft --config.data.source=files:runs/pairs.jsonl
"""

import ml_collections

from jtrain.configs import arithmetic_sft


def get_config() -> ml_collections.ConfigDict:
    """Returns DPO of the arithmetic SFT model on its own mistakes."""
    c = arithmetic_sft.get_config()
    c.task = "dpo"
    c.data.source = "files:runs/arith/pairs.jsonl"  # conversational prompt/chosen/rejected
    c.model.init_from = "runs/arith/sft"
    c.dpo = ml_collections.ConfigDict()
    c.dpo.loss = "sigmoid"  # sigmoid | ipo | hinge | robust | simpo | orpo
    c.dpo.beta = 0.1
    c.dpo.label_smoothing = 0.0  # robust only
    c.dpo.gamma = 0.0  # simpo only
    # RPO: the chosen answer's NLL is added. Plain DPO (0.0) pushes the rejected answers down
    # and the right ones with them (digits are shared): test exact match fell 0.786 -> 0.162
    # here, while with the NLL term it rises (README, "Preference tuning and RL").
    c.dpo.sft_weight = 1.0
    c.dpo.reference = ""  # "" = model.init_from | a workdir | hf:PATH | none (simpo, orpo)
    c.train.seq_len = 48  # one pair per row: a question and its answer fit in 48 bytes
    c.train.batch_size = 32
    c.train.steps = 200
    c.optimizer.lr = 1e-4
    c.optimizer.weight_decay = 0.0  # as TRL: no pull towards zero away from the SFT weights
    c.schedule.warmup_steps = 20
    c.eval.every_steps = 100
    c.eval.steps = 4
    c.eval.generate.examples = 0  # exact match on the arithmetic test set: see the chain
    c.checkpoint.every_steps = 100
    return c
