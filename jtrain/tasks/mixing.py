"""Mixup and CutMix on the device: each training example is blended with another example of
its (micro-)batch, and so are their one-hot targets.

The random draws come from the step's dropout key, so they are a function of the seed and the
step and a resumed run mixes exactly as the uninterrupted one. Partners are found within the
batch the loss sees: with train.microbatches > 1, within each micro-batch (as in timm, where
mixing happens per batch on each device). Padding rows never occur in training batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mix(
    rng: jax.Array,
    image_BxHxWxC: jax.Array,
    targets_BxK: jax.Array,
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
) -> tuple[jax.Array, jax.Array]:
    """(mixed images, mixed targets). With both alphas set, each batch uses one of the two
    with equal probability; an alpha of 0 turns its method off."""
    pick_key, lam_key, box_key, perm_key = jax.random.split(rng, 4)
    partner = jax.random.permutation(perm_key, image_BxHxWxC.shape[0])
    other_image, other_targets = image_BxHxWxC[partner], targets_BxK[partner]
    alpha_mixup, alpha_cutmix = max(mixup_alpha, 1e-6), max(cutmix_alpha, 1e-6)
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha == 0 or jax.random.bernoulli(pick_key, 0.5))
    alpha = jnp.where(use_cutmix, alpha_cutmix, alpha_mixup)
    lam = jax.random.beta(lam_key, alpha, alpha)

    # Mixup: blend whole images.
    mixed_up = lam * image_BxHxWxC + (1 - lam) * other_image
    # CutMix: paste a box of the partner; lam becomes the share of the image left untouched.
    box_HxW = _box(box_key, image_BxHxWxC.shape[1:3], lam)
    cut = jnp.where(box_HxW[None, :, :, None], other_image, image_BxHxWxC)
    kept = 1.0 - box_HxW.mean()
    images = jnp.where(use_cutmix, cut, mixed_up)
    share = jnp.where(use_cutmix, kept, lam)
    return images, share * targets_BxK + (1 - share) * other_targets


def _box(rng: jax.Array, size_HW: tuple[int, int], lam: jax.Array) -> jax.Array:
    """A boolean [H, W] box covering about 1 - lam of the image at a random centre."""
    height, width = size_HW
    ratio = jnp.sqrt(1.0 - lam)
    cy_key, cx_key = jax.random.split(rng)
    cy = jax.random.randint(cy_key, (), 0, height)
    cx = jax.random.randint(cx_key, (), 0, width)
    half_h = (ratio * height / 2).astype(jnp.int32)
    half_w = (ratio * width / 2).astype(jnp.int32)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    inside_rows = (rows >= cy - half_h) & (rows < cy + half_h)
    inside_cols = (cols >= cx - half_w) & (cols < cx + half_w)
    return inside_rows & inside_cols
