"""Distillation of the digits CNN (configs/digits_cnn.py) into a CNN a ninth its size: the
student learns the teacher's class probabilities (softened by T) besides the labels.

    python -m jtrain.main --config=configs/digits_cnn.py --workdir=runs/digits_cnn
    python -m jtrain.main --config=configs/distill_digits.py --workdir=runs/distill_digits

The teacher reads exactly the student's (augmented, mixed) images, so its soft labels follow
the mixup. benchmarks/distill_demo.py compares the student's test accuracy with the same
student trained from scratch.
"""

import ml_collections

from jtrain.configs import digits_cnn


def get_config() -> ml_collections.ConfigDict:
    """Returns the digits recipe as a small student of runs/digits_cnn."""
    c = digits_cnn.get_config()
    c.task = "distill"
    c.distill = ml_collections.ConfigDict()
    c.distill.teacher = "runs/digits_cnn"  # a jtrain workdir of the same data
    c.distill.task = "classify"  # the student's own task: lm | sft | classify
    c.distill.alpha = 0.9  # weight of the KL term; 1 - alpha weighs the label loss
    c.distill.temperature = 4.0  # both distributions are softmax(logits / T)
    c.distill.kl = "forward"  # forward: KL(teacher || student) | reverse: KL(student || teacher)
    c.model.channels = 16  # 16 -> 32 -> 64 channels (the teacher: 32 -> 64 -> 128)
    c.model.blocks = 1
    # The teacher's soft labels already spread probability over the classes; smoothing the
    # hard labels too only blurs them (the student from scratch is run with the same recipe).
    c.classify.label_smoothing = 0.0
    return c
