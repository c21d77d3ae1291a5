"""Handwritten digits with a small Vision Transformer: 2x2 patches of the 8x8 images (16
tokens plus a class token), the decoder's attention blocks without a causal mask.

    python -m jtrain.main --config=configs/digits_vit.py --workdir=runs/digits_vit

Same data, augmentation, early stopping and evaluation as configs/digits_cnn.py. A ViT has no
convolution's prior that nearby pixels belong together, so on 1,241 training images it trails
the CNN; it is here as the family to scale up on larger image sets.
"""

import ml_collections

from jtrain.configs import digits_cnn


def get_config() -> ml_collections.ConfigDict:
    c = digits_cnn.get_config()
    c.model = ml_collections.ConfigDict(
        {
            "kind": "vit",
            "init_from": "",
            "image_size": 8,  # images:DIR are resized to this; patch_size must divide it
            "patch_size": 2,
            "d_model": 64,
            "n_layers": 4,
            "n_heads": 4,
            "d_ff": 128,
            "pooling": "mean",  # mean of the patch tokens | cls (the class token)
            "dropout": 0.1,
            "dtype": "float32",
        }
    )
    c.train.epochs = 60
    c.train.early_stopping.patience = 20
    c.optimizer.lr = 1e-3
    return c
