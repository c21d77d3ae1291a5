r"""The preference-tuning chain on the embedded arithmetic task, measured at every stage.

    python examples/arithmetic_chain.py --workdir=runs/arith

runs, with the recipes in configs/:

1. `sft`: supervised fine-tuning from scratch (configs/arithmetic_sft.py);
2. `pairs`: the SFT model answers training questions (`python -m jtrain.generate`, sampled at
   temperature 1); each wrong answer becomes a pair, the right answer chosen;
3. `dpo`: DPO on those pairs, the SFT model the reference (configs/arithmetic_dpo.py);
4. `reward`: a reward model on the same pairs (configs/arithmetic_reward.py): its test
   `accuracy` is the fraction of held-out pairs it ranks right;
5. `grpo` and `grpo_dynamic`: GRPO from the DPO model with an exact-match reward, without and
   with dynamic sampling (configs/arithmetic_grpo.py).

After each training stage the exact match of greedy answers to the 500 held-out test questions
(never trained on) is measured with `--mode=eval` (`WORKDIR/<stage>_test/metrics.jsonl`).
Every command is printed before it runs, and a finished stage is not run again, so an
interrupted chain picks up where it stopped. The summary goes to WORKDIR/chain.json. Extra
`--set=KEY=VALUE` flags reach every training command (e.g. `--set=train.steps=20` for a
smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from jtrain.data import arithmetic  # noqa: E402 - after the path is set

STAGES = ("sft", "pairs", "dpo", "reward", "grpo", "grpo_dynamic")
PAIR_QUESTIONS = 4000  # training questions the SFT model answers
PAIR_SAMPLES = 2  # answers sampled per question


def _run(command: list[str]) -> float:
    """Runs a command from the repository root, echoing it; returns its wall time."""
    print("+ " + " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True)
    return time.perf_counter() - start


def _main(config: str, workdir: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", "jtrain.main", f"--config=configs/{config}",
            f"--workdir={workdir}", *flags]  # fmt: skip


def _last(workdir: str, split: str) -> dict:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        events = [json.loads(line) for line in f]
    merged = {}
    for event in events:  # an evaluation may write its loss and generation scores apart
        if event.get("split") == split:
            merged.update(event)
    return merged


def exact_match(stage_dir: str) -> float:
    """Greedy exact match on the arithmetic test questions of a stage's final weights."""
    out = f"{stage_dir}_test"
    if not os.path.exists(os.path.join(out, "metrics.jsonl")):
        _run(_main("arithmetic_sft.py", out, "--mode=eval", f"--config.model.init_from={stage_dir}",
                   "--config.eval.split=test", "--config.eval.generate.examples=500"))  # fmt: skip
    return float(_last(out, "test")["exact_match"])


def make_pairs(sft_dir: str, workdir: str) -> str:
    """Pairs whose rejected answers are the SFT model's own wrong answers to train questions."""
    pairs = os.path.join(workdir, "pairs.jsonl")
    if os.path.exists(pairs):
        return pairs
    prompts, answers = (
        os.path.join(workdir, "pair_prompts.jsonl"),
        os.path.join(workdir, "answers.jsonl"),
    )
    with open(prompts, "w") as f:
        for question in arithmetic.questions("train")[:PAIR_QUESTIONS]:
            line = {"messages": [{"role": "user", "content": arithmetic.prompt(question)}],
                    "answer": arithmetic.answer(question)}  # fmt: skip
            for _ in range(PAIR_SAMPLES):
                f.write(json.dumps(line) + "\n")
    if not os.path.exists(answers):
        _run([sys.executable, "-m", "jtrain.generate", f"--model={sft_dir}",
              f"--prompts={prompts}", f"--output={answers}", "--temperature=1.0",
              "--max_new_tokens=8", "--batch_size=256"])  # fmt: skip
    seen, count = set(), 0
    with open(answers) as f, open(pairs + ".tmp", "w") as out:
        for line in f:
            record = json.loads(line)
            wrong = record["completion"].strip()
            key = (record["messages"][0]["content"], wrong)
            if wrong == record["answer"] or key in seen:
                continue
            seen.add(key)
            out.write(json.dumps({
                "prompt": record["messages"],
                "chosen": [{"role": "assistant", "content": record["answer"]}],
                "rejected": [{"role": "assistant", "content": wrong or "?"}],
            }) + "\n")  # fmt: skip
            count += 1
    os.replace(pairs + ".tmp", pairs)
    print(f"pairs: {count} wrong answers of {PAIR_QUESTIONS * PAIR_SAMPLES} sampled", flush=True)
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE for every stage")
    args = parser.parse_args()
    w, stages = args.workdir, args.stages.split(",")
    os.makedirs(w, exist_ok=True)
    extra = [f"--config.{item}" for item in args.set]
    stage_dir = {s: os.path.join(w, s) for s in STAGES}
    pairs_source = f"--config.data.source=files:{os.path.join(w, 'pairs.jsonl')}"
    from_sft = f"--config.model.init_from={stage_dir['sft']}"
    from_dpo = f"--config.model.init_from={stage_dir['dpo']}"
    plans = {
        "sft": ("arithmetic_sft.py", []),
        "dpo": ("arithmetic_dpo.py", [from_sft, pairs_source]),
        "reward": ("arithmetic_reward.py", [from_sft, pairs_source]),
        "grpo": ("arithmetic_grpo.py", [from_dpo]),
        "grpo_dynamic": ("arithmetic_grpo.py", [from_dpo, "--config.grpo.dynamic_sampling=True"]),
    }
    summary = {}
    for stage in stages:
        if stage == "pairs":
            make_pairs(stage_dir["sft"], w)
            continue
        config, flags = plans[stage]
        if not os.path.exists(os.path.join(stage_dir[stage], "metrics.jsonl")):
            summary[f"{stage}/seconds"] = _run(_main(config, stage_dir[stage], *flags, *extra))
        if stage == "reward":
            summary["reward/test_pair_accuracy"] = _last(stage_dir[stage], "test")["accuracy"]
        else:
            summary[f"{stage}/test_exact_match"] = exact_match(stage_dir[stage])
        print(json.dumps(summary, indent=1), flush=True)
    with open(os.path.join(w, "chain.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
