"""Language modelling: next-token cross-entropy on a decoder, for pretraining and continued
pretraining. Examples are token documents (BOS ... EOS); the end-of-run display is a sample."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jtrain import console, models, tasks
from jtrain.data import sources, tokenizers
from jtrain.models import lm_head
from jtrain.models.transformer import TransformerConfig
from jtrain.sampler import Sampler
from jtrain.tasks.base import Batch, LossOutput, Task
from jtrain.validation import require


def token_cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood in float32."""
    logits = logits_BxLxV.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
    return log_z - target_logit


def nll_and_correct(logits_BxLxV: jax.Array, targets_BxL: jax.Array):
    """(per-token negative log-likelihood, 1.0 where the argmax is the target), [B, L]."""
    correct = jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL
    return token_cross_entropy(logits_BxLxV, targets_BxL), correct.astype(jnp.float32)


@tasks.register("lm")
class LMTask(Task):
    """Predict every next token where the loss weight is 1.

    Batch keys: inputs, targets, loss_weight [B, L]; optional positions and segment_ids
    [B, L] for packed rows.
    """

    name = "lm"

    @classmethod
    def validate(cls, config) -> None:
        vocab = tokenizers.get_tokenizer(config.data.tokenizer).vocab_size
        require(
            config.model.vocab_size >= vocab,
            "model.vocab_size",
            config.model.vocab_size,
            f"must be at least the tokenizer's vocabulary size ({vocab})",
        )

    def examples(self, spec: sources.SourceSpec, split: str):
        data = self.config.data
        return sources.load_documents(spec, split, data.tokenizer, data.text_field)

    def make_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return models.family_of(self.config.model).make(self.config.model, head="logits", rngs=rngs)

    def loss(self, model, batch: Batch, *, dropout_rng=None, frozen=None) -> LossOutput:
        nll, correct = lm_head.per_token(
            model,
            batch["inputs"],
            batch["targets"],
            nll_and_correct,
            positions_BxL=batch.get("positions"),
            segment_ids_BxL=batch.get("segment_ids"),
            dropout_rng=dropout_rng,
        )
        weight = batch["loss_weight"].astype(jnp.float32)
        return LossOutput(
            loss_sum=jnp.sum(nll * weight),
            weight=jnp.sum(weight),
            sums={"accuracy": jnp.sum(correct * weight)},
        )

    def report(self, totals: LossOutput) -> dict[str, float]:
        metrics = super().report(totals)
        metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
        return metrics

    def flops_per_example(self, *, weight_grads: bool = True) -> float:
        seq_len = self.config.train.seq_len
        cfg = TransformerConfig.from_mapping(self.config.model)
        return seq_len * cfg.flops_per_token(seq_len, weight_grads=weight_grads)

    def batch_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        shape = (self.config.train.batch_size, self.config.train.seq_len)
        keys = ["inputs", "targets"]
        if self.config.data.get("packing", False):
            keys += ["segment_ids", "positions"]
        return {**{key: (shape, "int32") for key in keys}, "loss_weight": (shape, "float32")}

    def tokens_per_example(self) -> int:
        return self.config.train.seq_len

    def show(self, model: nnx.Module) -> None:
        """Prints a sample continuing `eval.sample_prompt` (none when eval.sample_tokens=0)."""
        e = self.config.eval
        if not e.sample_tokens:
            return
        tokenizer = tokenizers.get_tokenizer(self.config.data.tokenizer)
        ids, stop_id, shown_prompt = self.sample_prompt(tokenizer, e.sample_prompt)
        [completion] = Sampler(model).generate(
            [list(ids)],
            max_new_tokens=e.sample_tokens,
            stop_ids=[stop_id],
            temperature=e.sample_temperature,
            seed=self.config.seed,
        )
        new = completion.tokens[: -1 if completion.finish_reason == "stop" else None]
        how = f"temperature {e.sample_temperature}" if e.sample_temperature else "greedy"
        console.status(f"sample ({how}):\n{shown_prompt}{tokenizer.decode(new)}")

    def sample_prompt(self, tokenizer, prompt: str) -> tuple[np.ndarray, int, str]:
        """(prompt ids, the id that ends the sample, the prompt as printed)."""
        return tokenizer.encode(prompt, add_bos=True, add_eos=False), tokenizer.eos_id, prompt
