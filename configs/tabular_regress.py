"""Regress a table: disease progression after one year (scikit-learn's bundled diabetes set,
442 rows, 10 numeric columns) with a wide-and-deep MLP, early stopping on validation loss;
MSE, RMSE, MAE and R² reported in the target's units.

    python -m jtrain.main --config=configs/tabular_regress.py --workdir=runs/tabular_regress

On a set this small a plain MLP loses to linear regression: the linear path (linear_skip)
carries the linear part, the narrow, strongly regularised deep part only what is left.
Your own table: --config.data.source=csv:PATH --config.data.target=COLUMN.
"""

import ml_collections

from jtrain.configs import supervised


def get_config() -> ml_collections.ConfigDict:
    model = {
        "kind": "mlp",
        "width": 32,
        "depth": 1,
        "dropout": 0.3,
        "embed_dim": 4,
        "linear_skip": True,
        "activation": "gelu",
        "norm": "none",
        "dtype": "float32",
    }
    c = supervised.base("regress", "sklearn:diabetes", model)
    c.regress.loss = "mse"
    c.train.epochs = 100
    c.train.batch_size = 32
    c.train.early_stopping.patience = 15
    c.optimizer.lr = 3e-3
    c.optimizer.weight_decay = 0.1
    return c
