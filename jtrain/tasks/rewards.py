"""GRPO rewards: functions scoring completions, named in `grpo.rewards`, summed with weights.

A reward function is `fn(prompts, completions, **fields) -> list[float | None]`: one value
per completion. `fields` holds each extra record field (e.g. "answer") as a list aligned with
the prompts, so a function should accept `**fields` and pick what it needs. None means "not
applicable to this completion": it is left out of that reward's mean and std, and counts as 0
in the weighted total. A value that is not a finite number, or a list of the wrong length, is
an error naming the function.

`grpo.rewards` is a comma-separated list of entries, each `TARGET[(KEY=VALUE, ...)][=WEIGHT]`:

- TARGET is a registered name (`exact_match`, `format`, `length_penalty`), `NAME:ARGUMENT` for a
  registered factory that takes one (`reward_model:WORKDIR`, a trained jtrain reward model),
  or `module.path:function`, a reward function of your own imported from the working
  directory or PYTHONPATH (it takes no options: bind them in your code).
- options are passed to the registered factory; a VALUE is a number, bare text without
  `, ( ) ' "`, or a quoted string ('...' or "...") taken verbatim, backslashes included.
- WEIGHT (default 1) is any finite number; 0 logs a reward without training on it. As in
  `data.source`, a trailing `=NUMBER` is a weight: quote an ARGUMENT that ends in one.

Examples:

    exact_match
    exact_match=1, format(pattern=^-?[0-9]+$)=0.2
    exact_match(field=answer), length_penalty(target=8)=0.5, my_rewards:brevity=0.1
    format(pattern='^[0-9]{1,3}$'), reward_model:runs/rm=0.5

Built-ins: `exact_match(field="answer")`: 1.0 when the completion equals the record's field
after stripping both ends and collapsing each run of whitespace to one space, else 0.0 (None
where the field is None; no number is extracted from longer text). `format(pattern)`: 1.0
when the stripped completion fully matches the regular expression, else 0.0.
`length_penalty(target)`: -max(0, characters - target) / target, 0 up to `target` characters.

A Reward's name is its registered name or its function's name; a repeated name gets "_2",
"_3", ... in order ("total" is kept for the weighted sum). `score` gives the weighted total
and each reward's values (NaN where None); `metrics` gives `rewards/<name>/mean` and `/std`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from jtrain import user_code
from jtrain.validation import ConfigError

RewardFn = Callable[..., Sequence[float | None]]
REWARD_MODEL = "reward_model"  # registered elsewhere: `reward_model:WORKDIR`
TOTAL = "total"  # the weighted sum's name in metrics
_SYNTAX = (
    "write comma-separated TARGET[(KEY=VALUE, ...)][=WEIGHT] entries, TARGET a registered "
    "reward ({names}), reward_model:WORKDIR or module.path:function, e.g. "
    "'exact_match=1, format(pattern=^-?[0-9]+$)=0.2'"
)
_PYTHON_TARGET = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
_KEY = re.compile(r"[A-Za-z_]\w*")


@dataclasses.dataclass(frozen=True)
class Reward:
    """One entry of `grpo.rewards`: its metric name, weight in the total, and function."""

    name: str
    weight: float
    fn: RewardFn
    entry: str = ""  # the text of the entry, for messages


# The registry: factories that make reward functions from an entry's options.


@dataclasses.dataclass(frozen=True)
class _Factory:
    make: Callable[..., RewardFn]
    takes_argument: bool


_REGISTRY: dict[str, _Factory] = {}


def register(name: str, *, argument: bool = False):
    """Registers `make(**options) -> RewardFn` (`make(argument, **options)` if `argument`)."""

    def decorator(make: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        if name in _REGISTRY and _REGISTRY[name].make is not make:
            raise ValueError(f"A reward named {name!r} is already registered.")
        _REGISTRY[name] = _Factory(make, argument)
        return make

    return decorator


def names() -> tuple[str, ...]:
    """The registered reward names, sorted."""
    return tuple(sorted(_REGISTRY))


def _field(fields: Mapping[str, list], field: str, reward: str) -> list:
    if field not in fields:
        raise ValueError(
            f"The {reward} reward reads the record field {field!r}, but the records have "
            f"{sorted(fields) or 'no extra fields'}; add it to the records or set "
            f"{reward}(field=NAME)."
        )
    return fields[field]


def _normal(text: str) -> str:
    return " ".join(text.split())


@register("exact_match")
def exact_match(field: str = "answer") -> RewardFn:
    """1.0 where the completion equals record field `field` up to whitespace, else 0.0."""

    def reward(prompts, completions, **fields):
        references = _field(fields, field, "exact_match")
        return [
            None if ref is None else float(_normal(c) == _normal(str(ref)))
            for c, ref in zip(completions, references, strict=True)
        ]

    return reward


@register("format")
def format_match(pattern: str) -> RewardFn:
    """1.0 where the stripped completion fully matches regular expression `pattern`."""
    try:
        compiled = re.compile(str(pattern))
    except re.error as err:
        raise ValueError(f"pattern={pattern!r} is not a regular expression ({err})") from None

    def reward(prompts, completions, **fields):
        return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]

    return reward


@register("length_penalty")
def length_penalty(target: int) -> RewardFn:
    """-max(0, characters - target) / target: a penalty for each character past `target`."""
    if isinstance(target, bool) or not isinstance(target, int) or target <= 0:
        raise ValueError(f"target={target!r} must be a positive integer (characters)")

    def reward(prompts, completions, **fields):
        return [-max(0, len(c) - target) / target for c in completions]

    return reward


# The parser of grpo.rewards.


def _bad(spec, problem: str) -> ConfigError:
    syntax = _SYNTAX.format(names=", ".join(names()))
    return ConfigError(f"config.grpo.rewards={spec!r} is invalid: {problem}; {syntax}.")


def _unquoted(text: str, spec) -> list[tuple[int, str, int]]:
    """(index, character, depth) of each character outside quotes; depth 0: top level."""
    out, depth, quote = [], 0, ""
    for i, char in enumerate(text):
        if quote:  # inside '...' or "...": only the closing quote matters
            quote = "" if char == quote else quote
            continue
        if char in "'\"":
            quote = char
            continue
        depth -= char == ")"
        if depth < 0:
            raise _bad(spec, f"{text.strip()!r} closes a parenthesis it never opened")
        out.append((i, char, depth))
        depth += char == "("
    if quote or depth:
        raise _bad(spec, f"{text.strip()!r} has an unclosed {'quote' if quote else '('}")
    return out


def _split(text: str, sep: str, spec) -> list[str]:
    """`text` cut at each `sep` outside quotes and parentheses."""
    cuts = [i for i, char, depth in _unquoted(text, spec) if char == sep and depth == 0]
    return [text[lo + 1 : hi] for lo, hi in zip([-1, *cuts], [*cuts, len(text)], strict=True)]


def _value(text: str, what: str, spec):
    """An option value: a quoted string, an int, a float, or bare text."""
    text = text.strip()
    if text[:1] in ("'", '"'):
        if len(text) < 2 or text[-1] != text[0] or text[0] in text[1:-1]:
            raise _bad(spec, f"{what} is not one quoted string: {text}")
        return text[1:-1]  # verbatim: a regular expression's backslashes stay as written
    if not text or any(c in text for c in "'\"()"):
        raise _bad(spec, f"{what} is empty or needs quotes: {text!r}")
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _options(text: str, entry: str, spec) -> dict:
    options = {}
    for item in _split(text, ",", spec):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not _KEY.fullmatch(key):
            problem = f"option {item.strip()!r} is not KEY=VALUE (quote a value with a comma)"
            raise _bad(spec, f"in {entry!r}, {problem}")
        if key in options:
            raise _bad(spec, f"in {entry!r}, option {key!r} is given twice")
        options[key] = _value(raw, f"in {entry!r}, the value of {key}", spec)
    return options


def _pieces(entry: str, spec) -> tuple[str, dict, float]:
    """(target, options, weight) of one entry."""
    parens = [i for i, char, depth in _unquoted(entry, spec) if char in "()" and depth == 0]
    if len(parens) > 2:
        raise _bad(spec, f"{entry!r} has more than one (options) group")
    if parens:
        opened, closed = parens
        head, rest = entry[:opened], entry[closed + 1 :].strip()
        options = _options(entry[opened + 1 : closed], entry, spec)
        if rest and not rest.startswith("="):
            raise _bad(spec, f"{entry!r} has {rest!r} after its options, not =WEIGHT")
        tail = rest[1:] if rest else None
    else:
        options = {}
        head, sep, tail = entry.rpartition("=")
        if not sep or (":" in head and not _is_number(tail)):
            head, tail = entry, None  # no weight, or an "=" inside an argument's path
    weight = 1.0
    if tail is not None:
        if not _is_number(tail):
            raise _bad(spec, f"the weight of {head.strip()!r} is not a number: {tail.strip()!r}")
        weight = float(tail)
        if not math.isfinite(weight):
            raise _bad(spec, f"the weight of {head.strip()!r} must be finite")
    return head.strip(), options, weight


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _argument(text: str, entry: str, spec) -> str:
    text = text.strip()
    value = _value(text, f"in {entry!r}, the argument", spec) if text[:1] in "'\"" else text
    if not value:
        raise _bad(spec, f"{entry!r} names no argument after ':'")
    return value


def _user_function(target: str, entry: str, spec) -> RewardFn:
    """The reward function `module.path:function` names, imported like config.task's."""
    module_name = target.rpartition(":")[0]
    try:
        module_name, function_name, function = user_code.attribute(target)
    except Exception as err:  # any failure to import is the user's to fix; say which
        raise _bad(
            spec,
            f"in {entry!r}, cannot import {module_name!r} ({type(err).__name__}: {err}); run "
            "from the directory that holds it or put it on PYTHONPATH",
        ) from err
    if not callable(function):
        raise _bad(spec, f"in {entry!r}, {module_name} has no function {function_name!r}")
    return function


def _made(name: str, factory: _Factory, args: tuple, options: dict, entry: str, spec):
    """The reward function `factory` makes; a bad option is a ConfigError naming `entry`."""
    signature = inspect.signature(factory.make)
    try:
        signature.bind(*args, **options)
    except TypeError as err:
        takes = ", ".join(list(signature.parameters)[len(args) :]) or "no options"
        raise _bad(spec, f"in {entry!r}, {err}; {name} takes {takes}") from None
    try:
        fn = factory.make(*args, **options)
    except ValueError as err:
        raise _bad(spec, f"in {entry!r}, {err}") from None
    if not callable(fn):
        raise _bad(spec, f"in {entry!r}, {name}'s factory returned no function")
    return fn


def _make(head: str, options: dict, entry: str, spec) -> tuple[str, RewardFn]:
    """(name, function) of an entry's target."""
    name, colon, rest = head.partition(":")
    factory = _REGISTRY.get(name)
    if factory is None and name == REWARD_MODEL:
        raise _bad(
            spec,
            f"{entry!r} needs a reward-model loader, and none is registered under "
            f"{REWARD_MODEL!r} (a module must call rewards.register({REWARD_MODEL!r}, "
            "argument=True) before grpo.rewards is read)",
        )
    if factory is not None:
        if factory.takes_argument != bool(colon):
            usage = f"{name}:ARGUMENT" if factory.takes_argument else name
            raise _bad(spec, f"{entry!r} is not written {usage}")
        args = (_argument(rest, entry, spec),) if colon else ()
        return name, _made(name, factory, args, options, entry, spec)
    if not (colon and _PYTHON_TARGET.fullmatch(head)):
        raise _bad(spec, f"{head!r} is not a registered reward or module.path:function")
    if options:
        raise _bad(
            spec,
            f"{entry!r}: a module.path:function reward takes no options; bind them in your "
            "code (functools.partial)",
        )
    return rest, _user_function(head, entry, spec)


def parse(spec) -> list[Reward]:
    """The rewards `grpo.rewards` names (see the module docstring); ConfigError if bad."""
    if not isinstance(spec, str) or not spec.strip():
        raise _bad(spec, "it must be a non-empty string")
    entries = [entry.strip() for entry in _split(spec, ",", spec)]
    if not all(entries):
        raise _bad(spec, "it has an empty entry between commas")
    used, rewards = {TOTAL}, []
    for entry in entries:
        head, options, weight = _pieces(entry, spec)
        name, fn = _make(head, options, entry, spec)
        unique, count = name, 1
        while unique in used:  # two entries of one reward, or a user function named "total"
            count += 1
            unique = f"{name}_{count}"
        used.add(unique)
        rewards.append(Reward(unique, weight, fn, entry))
    return rewards


# Scoring a batch of completions.


def _checked(reward: Reward, result, n: int) -> np.ndarray:
    """`result` as float64 with NaN for None; a ValueError names the reward's function."""
    source = reward.entry or getattr(reward.fn, "__qualname__", repr(reward.fn))
    what = f"The reward function of {reward.name!r} ({source})"
    if isinstance(result, (str, bytes, Mapping)) or not hasattr(result, "__len__"):
        raise ValueError(
            f"{what} returned a {type(result).__name__}; return a list with one float or "
            "None per completion."
        )
    if len(result) != n:
        raise ValueError(f"{what} returned {len(result)} values for {n} completions.")
    values = np.empty(n, dtype=np.float64)
    for i, value in enumerate(result):
        if value is None:
            values[i] = np.nan
        elif isinstance(value, numbers.Real) and math.isfinite(value):
            values[i] = float(value)
        else:
            raise ValueError(
                f"{what} returned {value!r} for completion {i}; each value must be a finite "
                "number, or None where the reward does not apply."
            )
    return values


def score(
    rewards: Sequence[Reward],
    prompts: Sequence[str],
    completions: Sequence[str],
    fields: Mapping[str, Sequence],
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(weighted total [N] float64, {name: values [N], NaN where None}) of `completions`."""
    n = len(prompts)
    if len(completions) != n:
        raise ValueError(f"{len(completions)} completions for {n} prompts; pass one each.")
    for key, values in fields.items():
        if key in ("prompts", "completions"):
            raise ValueError(f"A record field may not be named {key!r}: rename it.")
        if len(values) != n:
            raise ValueError(f"Field {key!r} has {len(values)} values for {n} prompts.")
    total, per_reward = np.zeros(n, dtype=np.float64), {}
    for reward in rewards:
        # Fresh lists per function: one that mutates its inputs cannot change the next's.
        result = reward.fn(
            list(prompts), list(completions), **{k: list(v) for k, v in fields.items()}
        )
        values = _checked(reward, result, n)
        per_reward[reward.name] = values
        total += reward.weight * np.where(np.isnan(values), 0.0, values)
    return total, per_reward


def metrics(total: np.ndarray, per_reward: Mapping[str, np.ndarray]) -> dict[str, float]:
    """`rewards/<name>/mean` and `/std` over applicable values; "total" is the weighted sum.

    A reward that applied to no completion in the batch has no entries (never a NaN metric).
    """
    out = {}
    for name, values in {TOTAL: np.asarray(total), **per_reward}.items():
        kept = values[~np.isnan(values)]
        if kept.size:
            out[f"rewards/{name}/mean"] = float(kept.mean())
            out[f"rewards/{name}/std"] = float(kept.std())
    return out
