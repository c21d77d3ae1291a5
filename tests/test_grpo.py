"""GRPO: rollouts (dynamic sampling, batches, exact resume) and the task's step on a model."""

import json
import os
import shutil
import types

import jax
import numpy as np
import pytest

from jtrain import config as config_lib
from jtrain.metrics import read_metrics
from jtrain.run import train_and_evaluate
from jtrain.sampler import Completion
from jtrain.tasks import rewards, rollouts
from jtrain.tasks.grpo_prompts import Prompt
from tests.conftest import tiny_config

G = 4  # completions per prompt


def _settings(**overrides) -> rollouts.Settings:
    values = dict(
        num_generations=G,
        max_completion_length=4,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        scale_rewards="group",
        iterations=1,
        mask_truncated=False,
        dynamic_sampling=False,
        dynamic_sampling_rounds=4,
    )
    return rollouts.Settings(**{**values, **overrides})


class _StubTask:
    """Completions without a model: prompt i's completions are "k" for k in its group's
    seed-dependent draws; prompts whose `flat` field is set always give the same answer."""

    pad_id = 0

    def __init__(self):
        self.rewards = rewards.parse("exact_match")
        self.sampled_prompts = []

    def policy(self, exp, state):
        return None

    def sample(self, model, prompts, per_prompt, *, seed):
        rng = np.random.default_rng(seed)
        self.sampled_prompts += [p.where for p in prompts]
        out = []
        for p in prompts:
            for _ in range(per_prompt):
                answer = 7 if p.fields["flat"] else int(rng.integers(6, 9))
                out.append(
                    Completion(
                        np.array([answer, 2], np.int32), np.full(2, -0.5, np.float32), "stop"
                    )
                )
        return out

    def completion_text(self, completion):
        return str(int(completion.tokens[0]))

    def logprob_gap(self, exp, state, batch):
        return 0.0


def _exp(batch_size: int):
    config = types.SimpleNamespace(
        train=types.SimpleNamespace(batch_size=batch_size, seq_len=8), seed=3
    )
    return types.SimpleNamespace(config=config, global_batch=lambda batch: batch)


def _prompts(n: int, flat_every: int = 2) -> tuple[Prompt, ...]:
    return tuple(
        Prompt(
            np.array([1, 5, 5], np.int32),
            f"q{i}",
            {"answer": "7", "flat": i % flat_every == 0},
            f"p:{i}",
        )
        for i in range(n)
    )


def test_rollout_batch_layout_and_advantages(tmp_path):
    source = rollouts.Rollouts(
        _exp(8), _StubTask(), _prompts(10, flat_every=1), _settings(), str(tmp_path)
    )
    batch = source.next(None)
    assert batch["inputs"].shape == (8, 8) and batch["targets"].shape == (8, 8)
    # Prompt [1, 5, 5] then the completion [answer, 2]: targets 2 and 3 are the completion's.
    np.testing.assert_array_equal(batch["completion"][0], [0, 0, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch["inputs"][0, :5], [1, 5, 5, 7, 2])
    np.testing.assert_array_equal(batch["old_logps"][0, 2:4], [-0.5, -0.5])
    # Every prompt is flat here: all rewards equal, so no advantage.
    np.testing.assert_array_equal(batch["advantages"], 0.0)
    assert source.metrics()["frac_reward_zero_std"] == 1.0


def test_dynamic_sampling_drops_flat_groups_and_refills(tmp_path):
    task = _StubTask()
    source = rollouts.Rollouts(
        _exp(16), task, _prompts(40), _settings(dynamic_sampling=True), str(tmp_path)
    )
    batch = source.next(None)
    groups = batch["advantages"].reshape(-1, G)
    assert np.all(np.abs(groups).max(axis=1) > 0), "a group without signal was trained on"
    m = source.metrics()
    assert m["dynamic_sampling/dropped_groups"] >= 2 and m["dynamic_sampling/filled"] == 0
    assert m["dynamic_sampling/rounds"] >= 2
    assert len(set(task.sampled_prompts)) == len(task.sampled_prompts)  # fresh prompts each round


def test_dynamic_sampling_keeps_the_shape_when_prompts_stay_flat(tmp_path):
    settings = _settings(dynamic_sampling=True, dynamic_sampling_rounds=2)
    source = rollouts.Rollouts(
        _exp(8), _StubTask(), _prompts(6, flat_every=1), settings, str(tmp_path)
    )
    batch = source.next(None)
    assert batch["advantages"].shape == (8,)
    assert source.metrics()["dynamic_sampling/filled"] == 2


def test_position_resumes_between_iterations(tmp_path):
    settings = _settings(iterations=2)
    first = rollouts.Rollouts(_exp(8), _StubTask(), _prompts(10), settings, str(tmp_path))
    batches = [first.next(None) for _ in range(3)]  # rollouts 0, 0, 1
    position = json.loads(json.dumps(first.get_state()))
    after = first.next(None)  # rollout 1's second iteration
    resumed = rollouts.Rollouts(_exp(8), _StubTask(), _prompts(10), settings, str(tmp_path))
    resumed.set_state(position)
    again = resumed.next(None)
    for key in after:
        np.testing.assert_array_equal(again[key], after[key])
    np.testing.assert_array_equal(batches[2]["inputs"], after["inputs"])
    assert resumed.metrics() == {}  # a reused batch's rollout metrics were logged before


# The task on a model: a tiny LM from tests/conftest, GRPO on digit-sum prompts.


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("grpo") / "prompts.jsonl"
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for _ in range(120):
            a, b = (int(x) for x in rng.integers(0, 5, 2))
            record = {"prompt": [{"role": "user", "content": f"{a}+{b}"}], "answer": str(a + b)}
            f.write(json.dumps(record) + "\n")
    return str(path)


def varied(prompts, completions, **fields):
    """A reward that differs within groups even for an untrained model's completions."""
    return [float(sum(map(ord, c)) % 3) for c in completions]


def _grpo_config(prompts, **overrides):
    """GRPO of a fresh LoRA model: its KL reference is its own base, adapters off."""
    config = tiny_config(
        task="grpo",
        data__source=f"files:{prompts}",
        train__steps=4,
        train__batch_size=8,
        train__log_every=1,
        eval__every_steps=0,
        checkpoint__every_steps=2,
        **overrides,
    )
    config.eval.generate.examples = 8
    config.grpo = {
        "num_generations": 4,
        "max_completion_length": 6,
        "rewards": "exact_match, tests.test_grpo:varied=0.5",
        "iterations": 2,
        "beta": 0.04,
    }
    config.model.lora.rank = 4
    config_lib.validate(config)
    return config


def test_grpo_run_logs_trl_metrics_and_resumes_exactly(tmp_path, prompts_file):
    workdir = str(tmp_path / "full")
    results = train_and_evaluate(_grpo_config(prompts_file), workdir)
    events = [
        e for e in read_metrics(os.path.join(workdir, "metrics.jsonl")) if e["split"] == "train"
    ]
    first = next(e for e in events if e["step"] == 1 and "loss" in e)
    for name in ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy",
                 "clip_ratio/region_mean", "completions/mean_length", "completions/clipped_ratio",
                 "rewards/exact_match/mean", "sampler_logprob_diff_max"):  # fmt: skip
        assert name in first, name
    assert first["sampler_logprob_diff_max"] < 1e-4  # the sampler's log-probs are the trainer's
    assert "reward" in results["test"] and "loss" not in results["test"]
    # Resume: the run as it was at its step-2 checkpoint (mid-way, rollout 1 not yet drawn).
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    for step in os.listdir(os.path.join(resumed, "checkpoints")):
        if step.isdigit() and int(step) > 2:
            shutil.rmtree(os.path.join(resumed, "checkpoints", step))
    os.remove(os.path.join(resumed, "metrics.jsonl"))
    train_and_evaluate(_grpo_config(prompts_file), resumed)
    again = {e["step"]: e["loss"] for e in read_metrics(os.path.join(resumed, "metrics.jsonl"))
             if e["split"] == "train" and "loss" in e}  # fmt: skip
    full = {e["step"]: e["loss"] for e in events if "loss" in e}
    assert again == {s: full[s] for s in (3, 4)}


def test_grpo_loss_is_the_same_for_any_split(tmp_path, prompts_file):
    """Micro-batches and devices: the same loss on the same rollout batch, to 1e-6."""
    from jtrain.experiment import Experiment

    batch, losses = None, []
    # Eight devices, whole (the run above's mesh and step: compiled once for both tests);
    # one device, two parts.
    for devices, micro in ((8, 1), (1, 2)):
        config = _grpo_config(prompts_file, train__microbatches=micro)
        config.mesh.data = devices
        exp = Experiment.from_config(config, jax.devices()[:devices])
        state = exp.init_state()
        if batch is None:  # one rollout batch, sampled once, for every split
            source = exp.task.batch_source(exp, str(tmp_path))
            source.next(state)
            batch = dict(source.current)
            # Off-policy old log-probs (as after an update): ratios != 1, a loss far from 0.
            noise = np.random.default_rng(0).uniform(-0.3, 0.3, batch["old_logps"].shape)
            batch["old_logps"] = (batch["old_logps"] + noise * batch["completion"]).astype(
                np.float32
            )
        _, metrics = exp.train_step(state, exp.global_batch(batch))
        losses.append([float(metrics["loss"]), float(metrics["grad_norm"])])
    assert abs(losses[0][0]) > 1e-3
    # f32 sums in another order: terms of order 1 cancel to a loss of order 0.01, so the
    # rounding (~1e-7 absolute) is allowed as atol beside the 1e-6 relative tolerance.
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-6, atol=1e-7)
