"""dpo.precompute_reference: the reference's log-probs computed once before training give the
same losses as the reference run inside every step, with no reference in the frozen state; the
workdir's copy is reused by a resumed run and by --mode=eval, and recomputed when the
reference changes."""

import json
import math
import os
import shutil

import ml_collections
import numpy as np
import pytest

from jtrain import config as config_lib
from jtrain import frozen_sources, run, runs
from jtrain.experiment import Experiment
from jtrain.metrics import read_metrics
from jtrain.tasks import dpo, dpo_reference
from jtrain.validation import ConfigError
from tests.conftest import tiny_config, train_losses

# TRL's tiny Llama models and tokenizer, and pairs in every TRL format (tests/golden/README).
E2E = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "dpo_e2e")
POLICY, REFERENCE = (f"hf:{os.path.join(E2E, name)}" for name in ("policy", "reference"))


class _Interrupted(Exception):
    pass


def _interrupt(*args, **kwargs):
    raise _Interrupted


def _config(*, precompute: bool, reference: str = "", lora_rank: int = 0, base_dtype="float32"):
    pairs = os.path.join(E2E, "pairs.jsonl")
    config = tiny_config(
        task="dpo",
        data__source=f"files:train={pairs};val={pairs};test={pairs}",
        data__tokenizer=os.path.join(E2E, "tokenizer"),
        data__chat_template="tokenizer",
        model__init_from=POLICY,
        train__seq_len=32,
        train__batch_size=8,
        train__steps=3,
        train__log_every=1,
        eval__every_steps=0,
        eval__steps=-1,
        checkpoint__every_steps=0,
        optimizer__lr=1e-2,
        schedule__warmup_steps=0,
        data__prefetch=0,
    )
    config.model.lora.update(rank=lora_rank, base_dtype=base_dtype)
    config.dpo = ml_collections.ConfigDict(
        {"reference": reference, "precompute_reference": precompute}
    )
    config_lib.prepare(config)  # the model's architecture from the HF config.json
    return config


class _Counter:
    """Counts the reference passes over the pairs (dpo_reference.compute)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        compute = dpo_reference.compute

        def counted(task, exp, pairs):
            self.calls += 1
            return compute(task, exp, pairs)

        monkeypatch.setattr(dpo_reference, "compute", counted)


def _val(workdir, step: int) -> dict:
    events = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    return next(e for e in events if e["split"] == "val" and e["step"] == step)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    plain = str(tmp_path_factory.mktemp("plain"))
    run.train_and_evaluate(_config(precompute=False), plain)
    pre = str(tmp_path_factory.mktemp("pre"))
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        counter = _Counter(mp)
        for stop in (True, False, True):  # interrupted, resumed to the end, rerun finished
            with pytest.MonkeyPatch.context() as loop:
                if stop:  # right after the reference pass, before any step
                    loop.setattr(run.Loop, "run", _interrupt)
                try:
                    run.train_and_evaluate(_config(precompute=True), pre)
                except _Interrupted:
                    pass
            calls.append(counter.calls)
    return {"plain": plain, "pre": pre, "calls": calls}


def test_same_losses_as_the_reference_in_the_step(setup):
    plain, pre = setup["plain"], setup["pre"]
    before = _val(plain, 0)
    assert before["loss_weight"] == 9
    assert before["loss"] == pytest.approx(math.log(2), rel=1e-6)  # policy == reference
    for metric, value in before.items():
        if isinstance(value, float):
            assert _val(pre, 0)[metric] == pytest.approx(value, rel=1e-6, abs=1e-7), metric
    # The saved log-probs are the reference's: at step 0 the policy's, whose means are logged.
    saved = json.load(open(os.path.join(pre, dpo.REFERENCE_LOGPS)))
    (val,) = (
        v for (_, split), v in dpo_reference.decode_logps(saved["logps"]).items() if split == "val"
    )
    np.testing.assert_allclose(
        val.mean(axis=0), [before["logps/chosen"], before["logps/rejected"]], rtol=1e-6
    )
    expected = train_losses(plain)
    assert sorted(expected) == [1, 2, 3]
    np.testing.assert_allclose(
        [train_losses(pre)[s] for s in expected], list(expected.values()), rtol=1e-6
    )
    assert expected[3] < expected[1]  # it trained


def test_no_reference_is_kept_in_the_frozen_state(setup):
    plain = Experiment.from_config(_config(precompute=False))
    pre = Experiment.from_config(_config(precompute=True))
    assert dpo.REFERENCE in plain.abstract_state.frozen
    assert dpo.REFERENCE not in pre.abstract_state.frozen and pre.task.frozen_models() == {}
    assert pre.task.flops_per_example() < plain.task.flops_per_example()


def test_a_lora_runs_reference_is_its_base_as_the_run_stores_it(setup):
    saved = json.load(open(os.path.join(setup["pre"], dpo.REFERENCE_LOGPS)))
    (key,) = {k for k in dpo_reference.decode_logps(saved["logps"]) if k[1] == "val"}
    full = dpo_reference.decode_logps(saved["logps"])[key]
    exp = Experiment.from_config(_config(precompute=True, lora_rank=4, base_dtype="bfloat16"))
    files = exp.task.artifacts(exp, {})  # what a run does when it starts
    base = dpo_reference.decode_logps(files[dpo.REFERENCE_LOGPS]["logps"])[key]
    # The base (model.init_from) as the run keeps it, in bfloat16: near the float32 weights'
    # log-probs, not equal to them.
    np.testing.assert_allclose(base, full, rtol=0.05)
    assert not np.allclose(base, full, rtol=1e-5)


def test_a_resumed_run_reuses_the_saved_log_probs(setup):
    assert setup["calls"] == [1, 1, 1]  # computed once, by the interrupted start
    saved = json.load(open(os.path.join(setup["pre"], dpo.REFERENCE_LOGPS)))
    assert set(saved["pairs"].values()) == {9}  # train, val, test: every pair
    assert saved["about"]["reference"]["spec"] == POLICY  # model.init_from, the default
    assert set(saved["about"]["reference"]["version"]) == {"config.json", "model.safetensors"}


def test_eval_mode_reuses_them(setup, monkeypatch, capsys):
    counter = _Counter(monkeypatch)
    ours = run.evaluate(_config(precompute=True), setup["pre"])
    assert counter.calls == 0 and "reused" in capsys.readouterr().out
    expected = _val(setup["plain"], 3)  # the plain run's last evaluation, of the same weights
    for metric, value in ours.items():
        assert value == pytest.approx(expected[metric], rel=1e-6, abs=1e-7), metric


def test_a_changed_reference_is_recomputed(setup, monkeypatch, capsys):
    saved = json.load(open(os.path.join(setup["pre"], dpo.REFERENCE_LOGPS)))
    calls = []

    def stub(task, exp, pairs):  # stands for the reference pass: what matters is that it runs
        calls.append(task.settings["reference"])
        return dpo_reference.decode_logps(saved["logps"])

    monkeypatch.setattr(dpo_reference, "compute", stub)
    exp = Experiment.from_config(_config(precompute=True, reference=REFERENCE))
    files = exp.task.artifacts(exp, {dpo.REFERENCE_LOGPS: saved})
    assert calls == [REFERENCE]
    assert "log-probs of other reference weights: computing" in capsys.readouterr().out
    assert files[dpo.REFERENCE_LOGPS]["fingerprint"] != saved["fingerprint"]
    assert files[dpo.REFERENCE_LOGPS]["about"]["data"] == saved["about"]["data"]


def test_weights_version_tells_checkpoints_and_files_apart(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "2").mkdir(parents=True)
    (run_dir / "checkpoints" / "2.orbax-checkpoint-tmp-1").mkdir()  # an unfinished save
    assert frozen_sources.version(str(run_dir))["step"] == 2
    (run_dir / "checkpoints" / "10").mkdir()
    assert frozen_sources.version(str(run_dir / "checkpoints"))["step"] == 10
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"1234")
    (hf / "tokenizer.json").write_text("{}")  # not the weights
    version = frozen_sources.version(f"hf:{hf}")
    assert sorted(version) == ["config.json", "model.safetensors"]
    (hf / "model.safetensors").write_bytes(b"12345")
    assert frozen_sources.version(f"hf:{hf}") != version


def test_a_finished_run_loads_without_its_log_probs(setup, tmp_path):
    assert runs.trained_model(setup["pre"]) is not None
    shutil.copy(os.path.join(setup["pre"], "config.json"), tmp_path / "config.json")
    task = runs.run_task(str(tmp_path))  # the file is a cache: prediction needs none of it
    assert task.artifacts_names() == (dpo.REFERENCE_LOGPS,)


@pytest.mark.parametrize(
    "key, value, message",
    [("precompute_reference", "yes", "must be True or False"), ("loss", "simpo", "no reference")],
)
def test_precompute_settings_that_cannot_work_are_refused(key, value, message):
    config = _config(precompute=True)
    config.dpo = ml_collections.ConfigDict({**config.dpo.to_dict(), key: value})
    with pytest.raises(ConfigError, match=message):
        dpo.DPOTask.validate(config)
