"""Distillation of the digits CNN (configs/digits_cnn.py, 696k parameters) into a CNN of 5.1k,
a 137th its size: the student learns the teacher's class probabilities (softened by T) besides
the labels.

    python -m jtrain.main --config=configs/digits_cnn.py --workdir=runs/digits_cnn
    python -m jtrain.main --config=configs/distill_digits.py --workdir=runs/distill_digits

The teacher reads exactly the student's (augmented, mixed) images, so its soft labels follow
the mixup. benchmarks/distill_demo.py compares the student's test accuracy with the same
student trained from scratch, seed by seed. The student is small on purpose: one of a ninth
the teacher's size (16 channels) comes within two test images of the teacher alone, and its
gain from the teacher was within seed noise; this one falls far short alone, and the teacher's
soft labels are worth several points of accuracy to it. The settings were chosen on validation
accuracy (benchmarks/results/distill_demo_cpu.txt lists those tried).
"""

import ml_collections

from jtrain.configs import digits_cnn


def get_config() -> ml_collections.ConfigDict:
    """Returns the digits recipe as a tiny student of runs/digits_cnn."""
    c = digits_cnn.get_config()
    c.task = "distill"
    c.distill = ml_collections.ConfigDict()
    c.distill.teacher = "runs/digits_cnn"  # a jtrain workdir of the same data
    c.distill.task = "classify"  # the student's own task: lm | sft | classify
    c.distill.alpha = 0.9  # weight of the KL term; 1 - alpha weighs the label loss
    c.distill.temperature = 4.0  # both distributions are softmax(logits / T)
    c.distill.kl = "forward"  # forward: KL(teacher || student) | reverse: KL(student || teacher)
    c.model.channels = 4  # 4 -> 8 -> 16 channels (the teacher: 32 -> 64 -> 128)
    c.model.blocks = 1  # one residual block per stage (the teacher: 2)
    # The teacher's soft labels already spread probability over the classes; smoothing the
    # hard labels too only blurs them (the student from scratch is run with the same recipe).
    c.classify.label_smoothing = 0.0
    return c
