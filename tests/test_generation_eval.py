"""Generation metrics during training and in --mode=eval: the split's prompts completed with
the sampler and scored against their references with jtrain.text_scores."""

import numpy as np

from jtrain import run, text_scores
from jtrain.metrics import read_metrics
from jtrain.runs import trained_model
from jtrain.sampler import Sampler
from jtrain.tasks.sft import SFTTask
from tests.test_sft import qa_records, sft_config, write_jsonl

SCORES = {"exact_match", "bleu", "chrf", "rouge_l"}


def test_an_sft_run_reports_generation_scores_and_eval_mode_repeats_them(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", qa_records(120))
    config = sft_config(f"files:{path}", seq_len=48, batch_size=8)
    config.train.steps = 4
    config.eval.every_steps = 0
    config.eval.sample_tokens = 0
    config.checkpoint.every_steps = 0
    config.eval.generate.examples = 5
    config.eval.generate.max_new_tokens = 12
    workdir = str(tmp_path / "run")
    run.train_and_evaluate(config, workdir)
    [event] = [e for e in read_metrics(workdir) if e["split"] == "val" and "bleu" in e]
    assert event["step"] == 4 and SCORES <= set(event)
    # The same numbers from the pieces: the task's prompts, the sampler, the scores.
    examples = SFTTask(config).generation_set("val", 5)
    assert len(examples.prompts) == 5
    completions = Sampler(trained_model(workdir)).generate(
        examples.prompts, max_new_tokens=12, stop_ids=examples.stop_ids, seed=config.seed
    )
    texts = [
        examples.decode(c.tokens[: -1 if c.finish_reason == "stop" else None].tolist())
        for c in completions
    ]
    expected = text_scores.score_all(texts, examples.references)
    for name in SCORES:
        assert np.isclose(event[name], expected[name], rtol=1e-9, atol=1e-12), name
    results = run.evaluate(config, workdir)  # --mode=eval scores generation too
    for name in SCORES:
        assert results[name] == event[name]
