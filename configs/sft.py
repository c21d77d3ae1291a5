"""Supervised fine-tuning: teach the default model to answer in a chat format.

The embedded example set needs no download: each public function and class of the standard
library with a docstring is a conversation, "Write the docstring for `mod.f(args)`." answered
by its docstring (`jtrain/data/docstrings.py`). The loss and accuracy count the response
tokens only. Start from the default pretraining run to fine-tune it (the run then validates
the starting weights at step 0, so metrics.jsonl holds the val loss before and after):

    python -m jtrain.main --config=configs/default.py --workdir=runs/default
    python -m jtrain.main --config=configs/sft.py --workdir=runs/sft \\
        --config.model.init_from=runs/default

Your own data: --config.data.source='files:chats/*.jsonl' (prompt/response or messages
records), and with a Hugging Face tokenizer --config.data.chat_template=tokenizer.
"""

import ml_collections

from jtrain.configs import default


def get_config() -> ml_collections.ConfigDict:
    """Returns the default model fine-tuned on docstring-writing conversations."""
    c = default.get_config()
    c.task = "sft"  # the LM loss on response tokens only
    c.model.init_from = ""  # from scratch; --config.model.init_from=runs/default fine-tunes
    c.data.source = "python_docstrings"  # or files:GLOB of .jsonl[.gz] chat records
    c.data.chat_template = "builtin"  # <BOS>User: ...\n\nAssistant: ...<EOS> (byte tokenizer)
    # Longer rows than pretraining's 128: 78% of the examples fit whole (the rest keep their
    # start, reported at load), and packing fills the rows.
    c.train.seq_len = 384
    c.train.batch_size = 16
    c.train.steps = 200
    # Below pretraining's 3e-3, with a fresh warmup: the optimizer state starts empty, and
    # large early updates would undo what a pretrained base knows.
    c.optimizer.lr = 1e-3
    c.schedule.warmup_steps = 20
    c.eval.every_steps = 100
    c.eval.sample_prompt = "Write the docstring for `inspect.isroutine(object)`."  # a val example
    c.checkpoint.every_steps = 100
    return c
