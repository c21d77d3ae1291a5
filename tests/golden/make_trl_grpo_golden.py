"""Golden numbers for `jtrain.tasks.grpo_losses`, produced by TRL's own GRPOTrainer.

    cd /work/main && .venv/bin/python tests/golden/make_trl_grpo_golden.py

writes tests/golden/trl_grpo.json (made with trl 1.16.0, transformers 5.24.0, torch 2.13 CPU).
Each case builds a real `GRPOTrainer` on a tiny random Llama saved to a temporary folder (so
the beta > 0 reference model loads from it like a real one) and:
- advantages: calls `_generate_and_score_completions` on a batch of prompts with a reward
  function that returns fixed rewards (None = unscorable), so the completions the tiny model
  samples do not matter; records the advantages and the logged reward metrics.
- loss: replaces the trainer's `_get_per_token_logps_and_entropies` with one returning fixed
  per-token log-probabilities and entropies, calls `_compute_loss` on one micro-batch that is
  the whole generation batch, and records the loss, the gradient with respect to the
  log-probabilities, and the logged metrics.
`generate()` is also what tests/test_grpo_losses.py runs in-process when trl is importable.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import warnings

import numpy as np

GOLDEN_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trl_grpo.json")
LOSSES = ("dapo", "grpo", "dr_grpo")
SCALES = ("group", "batch", "none")
# TRL's defaults (use_bias_correction_kl=True) at beta 0 and 0.04, and the plain k3 KL.
LOSS_CONFIGS = [
    {"loss_type": kind, "beta": beta, "use_bias_correction_kl": correct}
    for kind in LOSSES
    for beta, correct in ((0.0, True), (0.04, True), (0.04, False))
]
EPSILON, EPSILON_HIGH = 0.2, 0.28
GROUP_SIZE = 4
MAX_COMPLETION_LENGTH = 8  # longer than the T=6 tokens given, so dr_grpo's divisor is seen
# Three groups: varied rewards, a group whose rewards are all equal (zero std), and a group
# with an unscorable completion in the second case.
REWARDS = {
    "plain": [1.0, 0.0, 0.5, 2.0, 0.25, 0.25, 0.25, 0.25, -1.0, 0.0, 3.0, 0.5],
    "unscorable": [1.0, 0.0, 0.5, 2.0, 0.25, 0.25, 0.25, 0.25, -1.0, None, 3.0, 0.5],
}
LOSS_METRICS = ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean")
LOSS_METRICS += ("clip_ratio/region_mean", "clip_ratio/low_min", "clip_ratio/high_max")


def loss_inputs() -> dict[str, list]:
    """Fixed [N=8, T=6] inputs: ratios inside and beyond [1-eps, 1+eps_high], both signs of
    advantage and a zero one, varied completion lengths and one empty completion."""
    rng = np.random.default_rng(0)
    n, t = 8, 6
    logps = rng.uniform(-3.0, -0.1, (n, t))
    # log-ratios in [-0.6, 0.6]: ratios 0.55..1.82 against the clip range [0.8, 1.28]
    log_ratio = rng.uniform(-0.6, 0.6, (n, t))
    lengths = np.array([6, 5, 3, 6, 1, 4, 6, 0])
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)
    f32 = lambda x: np.asarray(x, np.float32).tolist()  # noqa: E731
    return {
        "logps": f32(logps),
        "old_logps": f32(logps - log_ratio),
        "ref_logps": f32(logps + rng.uniform(-0.5, 0.5, (n, t))),
        "entropy": f32(rng.uniform(0.1, 2.0, (n, t))),
        "advantages": f32([1.2, -0.7, 0.4, -1.5, 0.9, 0.0, -0.3, 0.8]),
        "mask": f32(mask),
    }


def _tiny_model_dir(root: str) -> str:
    """A random one-layer Llama and a word-level tokenizer, saved for from_pretrained."""
    import tokenizers
    import torch
    import transformers

    words = ["<pad>", "<eos>", "<unk>", "a", "b", "c", "d", "e", "f"]
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(words),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    path = os.path.join(root, "tiny")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _trainer(model_dir: str, workdir: str, reward_func, **config):
    """A GRPOTrainer on one CPU process: one micro-batch of 12 rows is the generation batch."""
    import datasets
    import trl

    args = trl.GRPOConfig(
        output_dir=workdir,
        per_device_train_batch_size=12,
        num_generations=GROUP_SIZE,
        max_completion_length=MAX_COMPLETION_LENGTH,
        epsilon=EPSILON,
        epsilon_high=EPSILON_HIGH,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        seed=0,
        **config,
    )
    dataset = datasets.Dataset.from_dict({"prompt": ["a b", "c d", "e f"]})
    trainer = trl.GRPOTrainer(
        model=model_dir, reward_funcs=reward_func, args=args, train_dataset=dataset
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's training loop otherwise
    return trainer


def _last_metrics(trainer, names) -> dict[str, float]:
    logged = trainer._metrics["train"]
    return {name: logged[name][-1] for name in names if name in logged}


def _advantages_case(model_dir, workdir, scale, rewards) -> dict:
    def fixed_reward(prompts, completions, **kwargs):
        return list(rewards)

    trainer = _trainer(model_dir, workdir, fixed_reward, scale_rewards=scale)
    prompts = [{"prompt": p} for p in ("a b", "c d", "e f") for _ in range(GROUP_SIZE)]
    out = trainer._generate_and_score_completions(prompts)
    metrics = _last_metrics(trainer, ("reward", "reward_std", "frac_reward_zero_std"))
    return {"advantages": out["advantages"].tolist(), "metrics": metrics}


def _loss_case(model_dir, workdir, inputs, **config) -> dict:
    import torch

    def reward(prompts, completions, **kwargs):
        return [0.0] * len(prompts)

    trainer = _trainer(model_dir, workdir, reward, **config)
    logps = torch.tensor(inputs["logps"], requires_grad=True)
    entropy = torch.tensor(inputs["entropy"])
    # The fixed log-probabilities stand in for the model's forward pass.
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logps, entropy, None)
    mask = torch.tensor(inputs["mask"])
    n, t = mask.shape
    batch = {
        "prompt_ids": torch.ones((n, 2), dtype=torch.long),
        "prompt_mask": torch.ones((n, 2), dtype=torch.long),
        "completion_ids": torch.ones((n, t), dtype=torch.long),
        "completion_mask": mask,
        "advantages": torch.tensor(inputs["advantages"]),
        "old_per_token_logps": torch.tensor(inputs["old_logps"]),
        "ref_per_token_logps": torch.tensor(inputs["ref_logps"]),
        # dapo's divisor: the completion tokens of the whole generation batch
        "num_items_in_batch": mask.sum(),
    }
    loss = trainer._compute_loss(trainer.model, batch)
    loss.backward()
    return {
        "loss": loss.item(),
        "grad_logps": logps.grad.tolist(),
        "metrics": _last_metrics(trainer, LOSS_METRICS),
    }


def _loss_name(config: dict) -> str:
    name = f"{config['loss_type']}/beta={config['beta']}"
    return name if config["use_bias_correction_kl"] else f"{name}/plain_kl"


def _jsonable(x):
    """NaN (TRL's nanmin over no sequences, an unscorable reward) as null: strict JSON."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    return x


def generate() -> dict:
    """Every case run through TRL; the JSON's content."""
    import transformers
    import trl

    inputs = loss_inputs()
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.logging.is_progress_bar_enabled()
    # Quiet: every case loads the model (a progress bar) and TRL notes the unscorable reward.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers' renamed arguments
            model_dir = _tiny_model_dir(root)
            workdir = os.path.join(root, "out")
            advantages = {
                f"{name}/{scale}": {"rewards": rewards, "scale": scale, "group_size": GROUP_SIZE}
                | _advantages_case(model_dir, workdir, scale, rewards)
                for name, rewards in REWARDS.items()
                for scale in SCALES
            }
            losses = {
                _loss_name(config): config | _loss_case(model_dir, workdir, inputs, **config)
                for config in LOSS_CONFIGS
            }
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()
    return _jsonable(
        {
            "versions": {"trl": trl.__version__, "transformers": transformers.__version__},
            "epsilon": EPSILON,
            "epsilon_high": EPSILON_HIGH,
            "max_completion_length": MAX_COMPLETION_LENGTH,
            "loss_inputs": inputs,
            "losses": losses,
            "advantages": advantages,
        }
    )


def main() -> None:
    with open(GOLDEN_PATH, "w") as f:
        json.dump(generate(), f, indent=1)
        f.write("\n")
    print(f"wrote {GOLDEN_PATH}", file=sys.stderr)


if __name__ == "__main__":
    main()
