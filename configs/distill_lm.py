"""Distillation of the default language model into a half-width student: the student learns
the teacher's next-byte distributions (softened by T) besides the bytes themselves.

    python -m jtrain.main --config=configs/default.py --workdir=runs/default
    python -m jtrain.main --config=configs/distill_lm.py --workdir=runs/distill_lm

The student trains for the default's steps on the default's data; `val` events report `ce`
(its own next-byte loss, the figure to compare with a run without a teacher) beside the
distillation loss and the KL. benchmarks/distill_demo.py compares it with the same student
trained from scratch.
"""

import ml_collections

from jtrain.configs import default


def get_config() -> ml_collections.ConfigDict:
    """Returns the default recipe as a half-width student of runs/default."""
    c = default.get_config()
    c.task = "distill"
    c.distill = ml_collections.ConfigDict()
    c.distill.teacher = "runs/default"  # a jtrain workdir or hf:PATH (its architecture too)
    c.distill.task = "lm"  # the student's own task: lm | sft | classify
    c.distill.alpha = 0.5  # weight of the KL term; 1 - alpha weighs the next-token loss
    c.distill.temperature = 2.0  # both distributions are softmax(logits / T)
    c.distill.kl = "forward"  # forward: KL(teacher || student) | reverse: KL(student || teacher)
    # Half the teacher's width: 64-wide residual stream, 4 heads of 16, SwiGLU of 192.
    c.model.d_model = 64
    c.model.head_dim = 16
    c.model.d_ff = 192
    return c
