"""The embedded SFT example set: write the docstring of a standard-library function or class.

Every public function, class and method with a docstring in the standard library's top-level
modules (the .py files beside `os.py`; parsed with `ast`, never imported) is one example:
the user asks "Write the docstring for `json.dumps(obj, *, skipkeys=False, ...)`." and the
assistant answers with the docstring, cleaned as `inspect.cleandoc` cleans it. Files are read
in sorted order, so the examples are the same on every run of one Python version; each goes to
the split of a hash of its docstring, so identical docstrings (overrides that repeat their
base's) never straddle splits. CPython 3.11 gives about 2,400 examples in about a second.
The set registers as `python_docstrings`, records of `{"prompt": ..., "response": ...}`.
"""

from __future__ import annotations

import ast
import functools
import glob
import os
import sysconfig

from jtrain.data import records

_SALT = "jtrain-docstrings-v1"
_MAX_EXAMPLES = 20_000  # a bound on load time should a future stdlib grow a lot


def _signature(node: ast.AST) -> str:
    if isinstance(node, ast.ClassDef):
        bases = [ast.unparse(b) for b in node.bases] + [ast.unparse(k) for k in node.keywords]
        return f"({', '.join(bases)})" if bases else ""
    return f"({ast.unparse(node.args)})"


def _examples_of(module: str, body: list[ast.stmt], prefix: str):
    """Yields (qualified name, prompt, docstring) for the public definitions in `body`."""
    for node in body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if node.name.startswith("_"):
            continue
        name = f"{prefix}{node.name}"
        doc = ast.get_docstring(node, clean=True)  # inspect.cleandoc
        if doc:
            kind = "class " if isinstance(node, ast.ClassDef) else ""
            prompt = f"Write the docstring for {kind}`{module}.{name}{_signature(node)}`."
            yield f"{module}.{name}", prompt, doc
        if isinstance(node, ast.ClassDef):
            yield from _examples_of(module, node.body, f"{name}.")


@functools.cache
def _python_docstrings() -> dict[str, tuple[tuple[str, str, str], ...]]:
    """{split: ((qualified name, prompt, docstring), ...)}, in file and definition order."""
    directory = sysconfig.get_paths()["stdlib"]
    out: dict[str, list] = {split: [] for split in records.SPLITS}
    count = 0
    for path in sorted(glob.glob(os.path.join(directory, "*.py"))):
        module = os.path.basename(path)[:-3]
        if module.startswith("_"):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            try:
                tree = ast.parse(f.read())
            except SyntaxError:  # e.g. a lib2to3 fixture; not an example
                continue
        for name, prompt, doc in _examples_of(module, tree.body, ""):
            out[records.split_of(f"{_SALT}:{doc}")].append((name, prompt, doc))
            count += 1
        if count >= _MAX_EXAMPLES:
            break
    return {split: tuple(examples) for split, examples in out.items()}


@records.register("python_docstrings", holds="chat")
def docstring_records(split: str) -> list[dict]:
    """The `python_docstrings` record set: `{"prompt": ..., "response": docstring}` records."""
    return [{"prompt": prompt, "response": doc} for _, prompt, doc in _python_docstrings()[split]]


def python_docstrings() -> dict[str, list[tuple[str, list[dict[str, str]]]]]:
    """Returns {split: [(where, messages), ...]}: docstring-writing conversations."""
    return {
        split: [
            (
                f"python_docstrings:{name}",
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": doc}],
            )
            for name, prompt, doc in examples
        ]
        for split, examples in _python_docstrings().items()
    }
