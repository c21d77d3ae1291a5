"""GRPO rewards: the built-ins, the grpo.rewards syntax and its errors, scoring and metrics."""

import math

import numpy as np
import pytest

from jtrain.tasks import rewards
from jtrain.validation import ConfigError


def values(spec: str, completions, **fields) -> list:
    """The values of the one reward `spec` names for `completions`."""
    (reward,) = rewards.parse(spec)
    return reward.fn(["q"] * len(completions), list(completions), **fields)


def test_exact_match_compares_after_strip_and_whitespace_runs():
    completions = ["95", " 95\n", "9 5", "95.", "The answer is 95", "-3", "a  b", "x"]
    answers = ["95", "95", "95", "95", "95", "-3", " a b", None]
    assert values("exact_match", completions, answer=answers) == [
        *(1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0),
        None,  # no reference: not applicable
    ]
    assert values("exact_match(field=label)", ["7"], label=[7], answer=["8"]) == [1.0]
    with pytest.raises(ValueError, match="reads the record field 'answer'.*field=NAME"):
        values("exact_match", ["1"], label=["1"])


def test_format_and_length_penalty():
    got = values("format(pattern=^-?[0-9]+$)", ["12", " -4\n", "1.5", "12 apples", ""])
    assert got == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert values(r"format(pattern='^\d{1,2}$')", ["12", "123"]) == [1.0, 0.0]
    assert values("length_penalty(target=4)", ["ab", "abcd", "abcdef", "x" * 12]) == [
        0.0,
        0.0,
        -0.5,
        -2.0,
    ]


def test_parse_names_weights_options_and_repeats():
    parsed = rewards.parse(
        "exact_match=1, format(pattern=^-?[0-9]+$)=0.2, length_penalty(target=8)=-0.5,"
        " format(pattern='a,(b)'), exact_match(field=answer)=0"
    )
    assert [(r.name, r.weight) for r in parsed] == [
        ("exact_match", 1.0),
        ("format", 0.2),
        ("length_penalty", -0.5),
        ("format_2", 1.0),
        ("exact_match_2", 0.0),
    ]
    assert parsed[1].entry == "format(pattern=^-?[0-9]+$)=0.2"
    assert parsed[3].fn(["q"], ["a,b", "a,(b)"]) == [1.0, 0.0]  # the quoted regex, verbatim
    assert set(rewards.names()) >= {"exact_match", "format", "length_penalty"}


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("", "non-empty string"),
        ("exact_match,,format(pattern=x)", "empty entry"),
        ("exact_mach", "'exact_mach' is not a registered reward"),
        ("exact_match=high", "weight of 'exact_match' is not a number"),
        ("exact_match=nan", "must be finite"),
        ("exact_match(field=a", "unclosed \\("),
        ("exact_match(field='a)", "unclosed quote"),
        ("exact_match)", "never opened"),
        ("exact_match(field=a) 2", "after its options, not =WEIGHT"),
        ("exact_match(field=a)(x=1)", "more than one"),
        ("exact_match(fild=a)", "unexpected keyword argument 'fild'.*takes field"),
        ("exact_match(field)", "'field' is not KEY=VALUE"),
        ("exact_match(field=a, field=b)", "'field' is given twice"),
        ("exact_match(field=)", "empty or needs quotes"),
        ("format", "missing a required argument: 'pattern'"),
        ("format(pattern=[0-9)", "not a regular expression"),
        ("format(pattern=a,b)", "quote a value with a comma"),
        ("length_penalty(target=0)", "positive integer"),
        ("length_penalty(target=2.5)", "positive integer"),
        ("exact_match:x", "not written exact_match"),
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
        ("math:no_such_function", "math has no function 'no_such_function'"),
        ("math:floor(x=1)", "takes no options"),
    ],
)
def test_bad_specs_name_the_entry_and_the_syntax(spec, problem):
    with pytest.raises(ConfigError, match=problem) as err:
        rewards.parse(spec)
    assert isinstance(err.value, ValueError)
    assert f"config.grpo.rewards={spec!r} is invalid" in str(err.value)
    assert "TARGET[(KEY=VALUE, ...)][=WEIGHT]" in str(err.value)


def test_a_registered_factory_with_an_argument(monkeypatch):
    from jtrain.tasks import reward  # noqa: F401 - registers the real one first, restored after

    monkeypatch.delitem(rewards._REGISTRY, rewards.REWARD_MODEL)
    made = []

    @rewards.register(rewards.REWARD_MODEL, argument=True)
    def make(workdir, scale=1.0):
        made.append(workdir)
        return lambda prompts, completions, **fields: [scale * len(c) for c in completions]

    first, second = rewards.parse("reward_model:runs/rm=0.5, reward_model:'runs/lr=0.1'(scale=2)")
    assert made == ["runs/rm", "runs/lr=0.1"]
    assert (first.name, first.weight, second.name, second.weight) == (
        "reward_model",
        0.5,
        "reward_model_2",
        1.0,
    )
    assert second.fn(["q"], ["abc"]) == [6.0]
    with pytest.raises(ConfigError, match="not written reward_model:ARGUMENT"):
        rewards.parse("reward_model")
    with pytest.raises(ValueError, match="already registered"):
        rewards.register(rewards.REWARD_MODEL, argument=True)(lambda workdir: None)


def test_a_user_function_from_a_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(
        "def brevity(prompts, completions, **fields):\n"
        "    return [1.0 / len(c) if c else None for c in completions]\n"
        "def total(prompts, completions, **fields):\n"
        "    return [0.0] * len(completions)\n"
    )
    monkeypatch.chdir(tmp_path)  # importable from the working directory, as config.task is
    parsed = rewards.parse("my_rewards_mod:brevity=0.1, my_rewards_mod:total")
    assert [(r.name, r.weight) for r in parsed] == [("brevity", 0.1), ("total_2", 1.0)]
    total, per_reward = rewards.score(parsed, ["a", "b"], ["abcd", ""], {})
    np.testing.assert_allclose(total, [0.025, 0.0])
    assert math.isnan(per_reward["brevity"][1])


def test_score_weights_none_and_metrics():
    parsed = rewards.parse("exact_match=2, format(pattern=[0-9]+)=0.5")
    prompts = ["What is 1 + 1?", "What is 2 + 2?", "What is 3 + 3?"]
    total, per_reward = rewards.score(
        parsed, prompts, ["2", "5", "six"], {"answer": ["2", "4", None]}
    )
    assert total.dtype == np.float64
    np.testing.assert_allclose(total, [2.5, 0.5, 0.0])  # None counts as 0 in the total
    np.testing.assert_array_equal(per_reward["exact_match"], [1.0, 0.0, np.nan])
    np.testing.assert_array_equal(per_reward["format"], [1.0, 1.0, 0.0])
    got = rewards.metrics(total, per_reward)
    assert got == pytest.approx(
        {
            "rewards/total/mean": 1.0,
            "rewards/total/std": np.std([2.5, 0.5, 0.0]),
            "rewards/exact_match/mean": 0.5,  # over the two applicable completions
            "rewards/exact_match/std": 0.5,
            "rewards/format/mean": 2 / 3,
            "rewards/format/std": np.std([1.0, 1.0, 0.0]),
        }
    )
    none_apply = {"exact_match": np.full(2, np.nan)}
    assert rewards.metrics(np.zeros(2), none_apply) == {
        "rewards/total/mean": 0.0,
        "rewards/total/std": 0.0,
    }


@pytest.mark.parametrize(
    "returned, problem",
    [
        ([1.0], "returned 1 values for 2 completions"),
        ("10", "returned a str"),
        (None, "returned a NoneType"),
        ([1.0, "1"], "returned '1' for completion 1"),
        ([1.0, float("nan")], "returned nan for completion 1.*or None"),
        ([1.0, float("inf")], "returned inf"),
    ],
)
def test_bad_reward_values_name_the_function(returned, problem):
    reward = rewards.Reward("mine", 1.0, lambda prompts, completions, **f: returned, "m:mine")
    with pytest.raises(ValueError, match=f"reward function of 'mine' \\(m:mine\\) {problem}"):
        rewards.score([reward], ["a", "b"], ["x", "y"], {})


def test_score_accepts_numpy_values_and_checks_its_inputs():
    reward = rewards.Reward("np", 1.0, lambda p, c, **f: np.array([1, 2], dtype=np.float32))
    total, _ = rewards.score([reward], ["a", "b"], ["x", "y"], {})
    np.testing.assert_array_equal(total, [1.0, 2.0])
    with pytest.raises(ValueError, match="1 completions for 2 prompts"):
        rewards.score([reward], ["a", "b"], ["x"], {})
    with pytest.raises(ValueError, match="Field 'answer' has 1 values for 2 prompts"):
        rewards.score([reward], ["a", "b"], ["x", "y"], {"answer": ["1"]})
    with pytest.raises(ValueError, match="may not be named 'completions'"):
        rewards.score([reward], ["a", "b"], ["x", "y"], {"completions": ["1", "2"]})
