"""Data drift monitoring of trained runs.

At the end of training a run saves a reference profile of its train split and its model's
outputs on it (`profile`, made by the task's `profilers` entry, from `hook`); `python -m
jtrain.drift` compares new data with it (`report`: per-column tests in `stats`, the domain
classifier in `domain`) and writes report.json and report.html (`html`).
"""
