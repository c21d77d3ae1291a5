"""The default image recipe: handwritten digits (scikit-learn's bundled 8x8 set, 1,797 images,
10 classes) with a small residual CNN, random-crop augmentation and mixup, validation every
epoch, early stopping on the best epoch, and the test split evaluated once on its weights.

    python -m jtrain.main --config=configs/digits_cnn.py --workdir=runs/digits_cnn

Writes runs/digits_cnn/eval/{val,test}_confusion_matrix.{json,png}. Your own images:
--config.data.source=images:DIR (one folder per class; DIR/train, DIR/val, DIR/test used when
present) with --config.model.image_size=32 and --config.augment.flip=True where mirrored
images are still the same class.
"""

import ml_collections

from jtrain.configs import supervised


def get_config() -> ml_collections.ConfigDict:
    model = {
        "kind": "cnn",
        "channels": 32,  # 8x8: 32 -> 64 -> 128 channels at 8x8, 4x4, 2x2
        "stages": 3,
        "blocks": 2,
        "norm": "group",
        "dropout": 0.1,
        "image_size": 32,  # images:DIR are resized to this; digits stay 8x8
        "dtype": "float32",
    }
    c = supervised.base("classify", "sklearn:digits", model)
    c.augment.crop_padding = 1  # one-pixel shifts: a digit moved a pixel is the same digit
    c.augment.mixup_alpha = 0.2
    c.classify.label_smoothing = 0.05
    c.train.epochs = 35
    c.train.batch_size = 64
    c.train.early_stopping.metric = "accuracy"
    c.train.early_stopping.mode = "max"
    c.train.early_stopping.patience = 15
    c.optimizer.lr = 2e-3
    c.optimizer.weight_decay = 0.05
    return c
