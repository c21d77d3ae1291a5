"""Data: text sources (sources.py), tokenizers (tokenizers.py) and Grain pipelines (pipeline.py).

Import the submodules directly; `jtrain.data.tokenizers` stays usable without importing Grain.
"""
