"""`python -m jtrain.drift` (`jtrain-drift`): see jtrain/drift/cli.py."""

from jtrain.drift.cli import command

if __name__ == "__main__":
    command()
