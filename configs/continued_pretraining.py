"""Continued pretraining: adapt a trained model to a new domain with the same LM objective.

The embedded example takes the default model, trained on the CPython documentation
(`configs/default.py`, workdir runs/default), and adapts it to Python source code: the
standard library's top-level modules, which ship with every Python. The run validates the
starting weights at step 0, so metrics.jsonl holds the domain loss before and after.

    python -m jtrain.main --config=configs/default.py --workdir=runs/default
    python -m jtrain.main --config=configs/continued_pretraining.py --workdir=runs/cpt
"""

import ml_collections

from jtrain.configs import default


def get_config() -> ml_collections.ConfigDict:
    """Returns the default recipe, started from runs/default and trained on stdlib code."""
    c = default.get_config()
    c.model.init_from = "runs/default"  # a jtrain workdir, or hf:PATH for Hugging Face weights
    # The new domain; a mixture such as "python_stdlib=0.9,pydoc_topics=0.1" keeps rehearsing
    # the old one.
    c.data.source = "python_stdlib"
    c.train.steps = 200
    # A lower peak than pretraining's 3e-3 and a fresh warmup: the optimizer state starts
    # empty, and large early updates would undo what the base model knows.
    c.optimizer.lr = 1e-3
    c.schedule.warmup_steps = 20
    c.eval.every_steps = 100
    c.eval.sample_prompt = "def "
    c.checkpoint.every_steps = 100
    return c
