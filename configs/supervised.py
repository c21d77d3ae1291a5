"""The base of the image and table recipes: the loop's keys from the default recipe, with the
model, data, task and augmentation keys of supervised learning. Not a recipe itself: see
digits_cnn.py, digits_vit.py, tabular_classify.py and tabular_regress.py.
"""

import ml_collections

from jtrain.configs import default


def base(task: str, source: str, model: dict) -> ml_collections.ConfigDict:
    """A config for `task` (classify | regress) on `source` with `model` (kind and its keys)."""
    c = default.get_config()
    c.task = task
    # The model family and its keys (jtrain/models/mlp.py, cnn.py, vit.py); init_from: start
    # from another run of the same recipe.
    c.model = ml_collections.ConfigDict({"init_from": "", **model})

    # sklearn:digits|breast_cancer|iris|wine|diabetes, csv:PATH, parquet:PATH, images:DIR.
    c.data.source = source
    c.data.target = ""  # csv/parquet: the label (classify) or value (regress) column
    c.data.features = ""  # csv/parquet: comma-separated feature columns ("" = all others)

    c.classify = ml_collections.ConfigDict()
    c.classify.label_smoothing = 0.0  # 1 - s on the label, s spread over every class
    c.classify.class_weights = ""  # "" | balanced | one weight per class, comma-separated
    c.classify.top_k = 5  # top-k accuracy's k (reported when 1 < k < classes)

    c.regress = ml_collections.ConfigDict()
    c.regress.loss = "mse"  # mse | huber (on the standardised target)
    c.regress.huber_delta = 1.0  # huber: quadratic below this many standard deviations

    # Images only: per-example on the host, and mixing within the batch on the device.
    c.augment = ml_collections.ConfigDict()
    c.augment.crop_padding = 0  # pad by this many pixels, crop back at a random offset
    c.augment.flip = False  # random left-right mirror (not for digits or text)
    c.augment.color_jitter = 0.0  # brightness/contrast/saturation scaled by 1 +- this
    c.augment.mixup_alpha = 0.0  # Beta(a, a) blend of two examples and their labels
    c.augment.cutmix_alpha = 0.0  # a box of another example pasted in, labels by area

    c.train.epochs = 30  # passes over the train split; validation after each
    c.train.batch_size = 64
    c.train.log_every = 20
    c.train.early_stopping.metric = "loss"  # stop when val loss stops improving ...
    c.train.early_stopping.patience = 8  # ... for this many epochs, then use the best epoch
    c.eval.sample_tokens = 0  # no text sample at the end
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 0.05
    c.schedule.name = "cosine"
    c.schedule.warmup_steps = 20
    c.schedule.final_lr_ratio = 0.0
    return c
