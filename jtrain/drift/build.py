"""Making a run's profile and report: the task's profiler on the model's train split (the
profile) or on new data (the report)."""

from __future__ import annotations

import os

from jtrain import atomic, runs
from jtrain.drift import profile, profilers, report
from jtrain.drift.profile import Sample


def write_profile(workdir: str, task, model, *, step: int | None = None) -> str:
    """Profiles the train split of `task` under `model` into WORKDIR/drift/; the JSON's path."""
    sample = profilers.get(task.name).reference(task, model)
    return profile.save(workdir, sample, {"task": task.name, "step": step})


def write_profile_of_run(workdir: str) -> str:
    """The profile of a finished run, from its saved config, files and final weights (a run
    made before profiles were saved; its training data must still be where it was)."""
    task = runs.run_task(workdir)
    profilers.get(task.name)  # an unsupported task fails before the model loads
    return write_profile(workdir, task, runs.trained_model(workdir))


def drift_report(workdir: str, source: str, **options) -> tuple[dict, Sample, Sample]:
    """The report on the new data `source` against the run's profile, with the reference
    and new samples (for the plots)."""
    content, reference = profile.load(workdir)
    task = runs.run_task(workdir)
    current = profilers.get(task.name).current(
        task, runs.trained_model(workdir), source, reference.meta
    )
    result = report.compare(reference, current, **options)
    result["reference"] = {"workdir": workdir, "rows": content["rows"], "step": content.get("step")}
    result["current"] = {
        "source": source,
        "rows": current.rows,
        "bad_rows": current.meta.get("bad_rows", 0),
    }
    return result, reference, current


def save_report(result: dict, output: str, reference=None, current=None) -> list[str]:
    """report.json and report.html in `output`; the paths written."""
    from jtrain.drift import html

    json_path = os.path.join(output, "report.json")
    atomic.write_json(json_path, result)
    html_path = os.path.join(output, "report.html")
    page = html.page(result, reference, current)

    def write_page(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(page)

    atomic.write(html_path, write_page)
    return [json_path, html_path]
