"""benchmarks/distill_demo.py's paired comparison: the statistics and the verdict on known
figures, and the report main appends, with the student runs replaced (nothing trains)."""

import math

import pytest

from benchmarks import distill_demo
from benchmarks.distill_demo import Paired


def test_mean_standard_error_and_counts_of_the_differences():
    paired = Paired([0.02, 0.04, 0.0, 0.06, -0.02], higher=True)
    assert paired.mean == pytest.approx(0.02)
    # Sample variance (n - 1): sum of squares 0.004 / 4 = 0.001; over n = 5: sqrt(0.0002).
    assert paired.stderr == pytest.approx(math.sqrt(0.0002))
    assert paired.counts() == (3, 1, 1)


def test_better_only_beyond_two_standard_errors():
    # Mean 0.02, standard error 0.01414: 2 SE = 0.0283 > 0.02, so not shown.
    assert not Paired([0.02, 0.04, 0.0, 0.06, -0.02], higher=True).better()
    # Mean 0.03, standard error 0.00447: clearly beyond.
    steady = Paired([0.03, 0.02, 0.04, 0.03, 0.03], higher=True)
    assert steady.better() and steady.verdict().startswith("better: mean difference +0.0300")
    # The same gain in a loss is a loss: worse, not better.
    assert not Paired([0.03, 0.02, 0.04, 0.03, 0.03], higher=False).better()


def test_lower_is_better_counts_and_verdict_for_a_loss():
    paired = Paired([-0.03, -0.032, -0.028], higher=False)  # distilled loss below scratch
    assert paired.counts() == (3, 0, 0) and paired.better()
    assert "t = 25.98 over 3 seeds" in paired.verdict()


def test_one_seed_or_identical_pairs_are_not_shown_better():
    one = Paired([0.05], higher=True)
    assert math.isnan(one.stderr) and not one.better()
    assert one.verdict().startswith("NOT shown better: one seed has no standard error")
    ties = Paired([0.0, 0.0, 0.0], higher=True)
    assert (
        ties.counts() == (0, 3, 0)
        and not ties.better()
        and ties.verdict().endswith("t = nan over 3 seeds")
    )
    # The same gain on every seed has no spread: better, with an infinite t.
    assert Paired([-0.01, -0.01], higher=False).verdict().endswith("t = inf over 2 seeds")
    # Equal accuracies may differ in the last bit: still a tie.
    assert Paired([1e-12, -1e-12], higher=True).counts() == (0, 2, 0)


def test_main_appends_a_dated_header_and_the_paired_report(tmp_path, monkeypatch, capsys):
    figures = {(0, True): 0.95, (0, False): 0.90, (1, True): 0.94, (1, False): 0.91}
    monkeypatch.setattr(distill_demo, "_teacher", lambda part, root: distill_demo.REPO_ROOT)
    monkeypatch.setattr(
        distill_demo,
        "_student",
        lambda part, root, seed, sets, *, distilled: figures[(seed, distilled)],
    )
    output = tmp_path / "results.txt"
    output.write_text("earlier results\n")
    argv = ["--parts=digits", "--seeds=2", f"--output={output}", "--set", "model.channels=4"]
    distill_demo.main(argv)
    lines = output.read_text().splitlines()
    assert lines[0] == "earlier results"
    assert lines[1].startswith("# ") and lines[1].endswith(
        f"python benchmarks/distill_demo.py {' '.join(argv)}"
    )
    assert lines[2] == "student overrides: model.channels=4"
    assert "distilled 0.9450 vs scratch 0.9050" in lines[3]
    assert lines[4] == (
        "digits: distilled - scratch per seed: +0.0500, +0.0300; mean +0.0400, standard error "
        "0.0100; distilled better on 2, equal on 0, worse on 0"
    )
    assert lines[5].startswith("digits: better: mean difference +0.0400 exceeds 2 standard")
    assert capsys.readouterr().out.endswith("\n".join(lines[2:]) + "\n")


def test_digits_default_to_eight_seeds_and_bad_flags_are_refused(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(distill_demo, "_teacher", lambda part, root: distill_demo.REPO_ROOT)
    monkeypatch.setattr(
        distill_demo,
        "_student",
        lambda part, root, seed, sets, *, distilled: calls.append((seed, distilled)) or 0.5,
    )
    distill_demo.main(["--parts=digits", f"--output={tmp_path / 'r.txt'}"])
    assert calls == [(seed, distilled) for seed in range(8) for distilled in (True, False)]
    assert "digits: NOT shown better: mean difference +0.0000" in capsys.readouterr().out
    for flags, message in (
        ("--seeds=0", "--seeds=0: give at least 1"),
        ("--parts=mnist", "--parts names mnist; allowed: lm, digits"),
    ):
        with pytest.raises(SystemExit):
            distill_demo.main([flags, f"--output={tmp_path / 'r.txt'}"])
        assert message in capsys.readouterr().err
