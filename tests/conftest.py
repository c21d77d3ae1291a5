"""Test setup: 8 fake CPU devices, set before jax initialises so every test can build meshes."""

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
