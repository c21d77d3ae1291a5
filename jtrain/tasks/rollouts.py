"""GRPO's batch source: rollouts sampled from the current weights, scored, made into batches.

Every `grpo.iterations` steps, `Rollouts.next(state)` takes the next batch_size /
num_generations prompts (a seeded shuffle, reshuffled every pass over the prompts), samples
num_generations completions of each with the KV-cache sampler on the state's weights, scores
them with the reward functions and turns the group-relative advantages into a training batch:
prompt and completion in one right-padded row, the completion's tokens weighted, and the
sampler's per-token log-probabilities as the "old" ones of the clipped ratio.

Dynamic sampling (DAPO): groups whose rewards are all equal carry no signal (advantage 0); with
`grpo.dynamic_sampling` they are dropped and fresh prompts sampled in their place, up to
`grpo.dynamic_sampling_rounds` rounds; a batch still short after that is topped up with dropped
groups (counted in `dynamic_sampling/filled`), so its shape never changes.

Exact resume: a rollout's samples depend only on the weights, the seed and the rollout's index,
so a restored state samples them again bit for bit; a rollout reused for several iterations is
also kept in WORKDIR/rollouts/ (the last two), so a run stopped between its iterations resumes
on the same batch. Sampling and scoring run on process 0's host; several processes are not
supported yet.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from jtrain import atomic
from jtrain.sampler import Completion
from jtrain.tasks import grpo_losses, rewards
from jtrain.tasks.grpo_prompts import Prompt

_KEEP = 2  # rollouts kept on disk


@dataclasses.dataclass(frozen=True)
class Settings:
    """The `grpo.*` values the rollouts read."""

    num_generations: int
    max_completion_length: int
    temperature: float
    top_k: int
    top_p: float
    scale_rewards: str
    iterations: int
    mask_truncated: bool
    dynamic_sampling: bool
    dynamic_sampling_rounds: int


@dataclasses.dataclass
class _Groups:
    """Sampled groups, num_generations adjacent completions per prompt."""

    prompts: list[Prompt] = dataclasses.field(default_factory=list)
    completions: list[Completion] = dataclasses.field(default_factory=list)
    rewards: list[np.ndarray] = dataclasses.field(default_factory=list)  # [G] totals
    per_reward: list[dict[str, np.ndarray]] = dataclasses.field(default_factory=list)


class Rollouts:
    """A `jtrain.loop.BatchSource` of GRPO rollouts; `task` samples and scores (GRPOTask)."""

    def __init__(self, exp, task, prompts, settings: Settings, workdir: str):
        if jax.process_count() > 1:
            raise NotImplementedError(
                "task=grpo samples on one host; run it as one process (any number of local "
                "devices). Multi-process rollouts are not supported yet."
            )
        self.exp, self.task, self.s = exp, task, settings
        self.prompts = prompts
        self.dir = os.path.join(workdir, "rollouts")
        batch = exp.config.train.batch_size
        self.per_rollout = batch // settings.num_generations  # prompts in a batch
        self.seed = exp.config.seed
        self.cursor, self.rollout, self.iteration = 0, -1, 0
        self.current: dict[str, np.ndarray] | None = None
        self.last_metrics: dict[str, float] = {}

    # BatchSource.

    def next(self, state) -> dict[str, jax.Array]:
        if self.current is None or self.iteration == self.s.iterations:
            self.rollout += 1
            self.current, self.last_metrics = self._sample(state)
            self.iteration = 0
            if self.s.iterations > 1:
                self._save(self.current)
        else:
            self.last_metrics = {}  # a reused batch: its rollout metrics were logged
        self.iteration += 1
        return self.exp.global_batch(self.current)

    def get_state(self) -> dict:
        return {"cursor": self.cursor, "rollout": self.rollout, "iteration": self.iteration}

    def set_state(self, position: dict) -> None:
        self.cursor, self.rollout = int(position["cursor"]), int(position["rollout"])
        self.iteration = int(position["iteration"])
        self.current = None
        if 0 < self.iteration < self.s.iterations:  # stopped between a rollout's iterations
            with np.load(self._path(self.rollout)) as saved:
                self.current = {k: saved[k] for k in saved.files}

    def metrics(self) -> dict[str, float]:
        return self.last_metrics

    # Sampling.

    def _take(self, count: int) -> list[Prompt]:
        """The next `count` prompts of the seeded, per-pass shuffled order."""
        n, out = len(self.prompts), []
        for position in range(self.cursor, self.cursor + count):
            epoch, index = divmod(position, n)
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
            out.append(self.prompts[int(order[index])])
        self.cursor += count
        return out

    def _round(self, model, prompts: list[Prompt], round_: int) -> _Groups:
        g = self.s.num_generations
        seed = int(np.random.default_rng([self.seed, self.rollout, round_]).integers(2**31))
        completions = self.task.sample(model, prompts, g, seed=seed)
        texts = [self.task.completion_text(c) for c in completions]
        fields = _fields(prompts, g)
        total, per = rewards.score(
            self.task.rewards, [p.prompt for p in prompts for _ in range(g)], texts, fields
        )
        groups = _Groups()
        for i, prompt in enumerate(prompts):
            rows = slice(i * g, (i + 1) * g)
            groups.prompts.append(prompt)
            groups.completions += completions[rows]
            groups.rewards.append(total[rows])
            groups.per_reward.append({k: v[rows] for k, v in per.items()})
        return groups

    def _sample(self, state) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        model = self.task.policy(self.exp, state)
        kept, dropped, sampled, rounds = _Groups(), _Groups(), _Groups(), 0
        while len(kept.prompts) < self.per_rollout:
            if rounds and not (self.s.dynamic_sampling and rounds < self.s.dynamic_sampling_rounds):
                break
            groups = self._round(model, self._take(self.per_rollout - len(kept.prompts)), rounds)
            rounds += 1
            for i in range(len(groups.prompts)):
                _extend(sampled, groups, i)
                flat = not np.ptp(groups.rewards[i]) if self.s.dynamic_sampling else False
                _extend(dropped if flat else kept, groups, i)
        filled = self.per_rollout - len(kept.prompts)
        for i in range(filled):  # still short: keep the shape with groups that teach nothing
            _extend(kept, dropped, i)
        batch = self._batch(kept)
        metrics = self._metrics(kept, sampled, batch)
        if self.s.dynamic_sampling:
            metrics["dynamic_sampling/rounds"] = float(rounds)
            metrics["dynamic_sampling/dropped_groups"] = float(len(dropped.prompts) - filled)
            metrics["dynamic_sampling/filled"] = float(filled)
        metrics["sampler_logprob_diff_max"] = self.task.logprob_gap(self.exp, state, batch)
        return batch, metrics

    # Batches and metrics.

    def _batch(self, groups: _Groups) -> dict[str, np.ndarray]:
        g, width = self.s.num_generations, self.exp.config.train.seq_len + 1
        rows = len(groups.completions)
        tokens = np.full((rows, width), self.task.pad_id, np.int32)
        mask = np.zeros((rows, width - 1), np.float32)
        old = np.zeros((rows, width - 1), np.float32)
        for r, completion in enumerate(groups.completions):
            prompt = groups.prompts[r // g].ids
            p, n = prompt.size, completion.tokens.size
            tokens[r, :p], tokens[r, p : p + n] = prompt, completion.tokens
            # Target t is token t + 1: the completion's tokens are targets p - 1 ... p + n - 2.
            truncated = completion.finish_reason == "length" and self.s.mask_truncated
            mask[r, p - 1 : p - 1 + n] = 0.0 if truncated else 1.0
            old[r, p - 1 : p - 1 + n] = completion.logprobs
        totals = np.concatenate(groups.rewards)
        advantages, _ = grpo_losses.group_advantages(totals, g, self.s.scale_rewards)
        return {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "completion": mask,
            "old_logps": old,
            "advantages": advantages,
            "loss_weight": np.ones(rows, np.float32),
        }

    def _metrics(self, kept: _Groups, sampled: _Groups, batch) -> dict[str, float]:
        """TRL's rollout metrics over every sampled group (the trained batch's advantages are
        what dynamic sampling changes)."""
        totals = np.concatenate(sampled.rewards)
        _, metrics = grpo_losses.group_advantages(
            totals, self.s.num_generations, self.s.scale_rewards
        )
        per = {k: np.concatenate([p[k] for p in sampled.per_reward]) for k in sampled.per_reward[0]}
        metrics.update(rewards.metrics(totals, per))
        lengths = np.array([c.tokens.size for c in sampled.completions], np.float64)
        clipped = np.array([c.finish_reason == "length" for c in sampled.completions])
        metrics["completions/mean_length"] = float(lengths.mean())
        metrics["completions/max_length"] = float(lengths.max())
        metrics["completions/clipped_ratio"] = float(clipped.mean())
        return metrics

    # Saved rollouts.

    def _path(self, rollout: int) -> str:
        return os.path.join(self.dir, f"{rollout}.npz")

    def _save(self, batch: dict[str, np.ndarray]) -> None:
        if jax.process_index() != 0:
            return
        os.makedirs(self.dir, exist_ok=True)

        def dump(temporary: str) -> None:
            with open(temporary, "wb") as f:  # a file object: savez would add ".npz" to a name
                np.savez(f, **batch)

        atomic.write(self._path(self.rollout), dump)
        old = self._path(self.rollout - _KEEP)
        if os.path.exists(old):
            os.remove(old)


def _extend(into: _Groups, source: _Groups, i: int) -> None:
    """Appends group i of `source` to `into`."""
    g = len(source.completions) // len(source.prompts)
    into.prompts.append(source.prompts[i])
    into.completions += source.completions[i * g : (i + 1) * g]
    into.rewards.append(source.rewards[i])
    into.per_reward.append(source.per_reward[i])


def _fields(prompts: list[Prompt], g: int) -> dict[str, list]:
    """Each extra record field as a list aligned with the completions (None where absent)."""
    names = sorted({k for p in prompts for k in p.fields})
    return {k: [p.fields.get(k) for p in prompts for _ in range(g)] for k in names}
