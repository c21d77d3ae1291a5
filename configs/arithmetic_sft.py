"""Arithmetic, stage 1 of the preference-tuning chain: supervised fine-tuning from scratch.

The embedded `arithmetic` set (jtrain/data/arithmetic.py) asks "What is 17 + 28?" and answers
"45", for every a + b and a - b with a, b in 0..49; 500 test questions (and their mirrors) are
never trained on. A small byte-level model learns the chat format and most of the task in a
few minutes on a laptop CPU, leaving room for DPO and GRPO to improve it:

    python -m jtrain.main --config=configs/arithmetic_sft.py --workdir=runs/arith_sft

The validation events hold the exact match of greedy answers to 200 validation questions;
`examples/arithmetic_chain.py` runs this stage and the ones after it and measures each on the
test questions.
"""

import ml_collections

from jtrain.configs import default


def get_config() -> ml_collections.ConfigDict:
    """Returns the small model trained on arithmetic conversations."""
    c = default.get_config()
    c.task = "sft"
    c.data.source = "arithmetic"  # prompt/response chat records, rendered with the template
    c.data.chat_template = "builtin"  # <BOS>User: What is 3 + 4?\n\nAssistant: 7<EOS>
    c.train.seq_len = 128  # about three conversations per packed row
    c.train.batch_size = 32
    c.train.steps = 800
    c.optimizer.lr = 3e-3
    c.schedule.warmup_steps = 50
    c.eval.every_steps = 200
    c.eval.steps = 4
    c.eval.generate.examples = 200  # exact match of greedy answers to validation questions
    c.eval.generate.max_new_tokens = 8
    c.eval.sample_prompt = "What is 17 + 28?"
    c.eval.sample_tokens = 8
    c.checkpoint.every_steps = 200
    return c
