"""The layout README promises: imports go one way, no module imports another's private
names, transformers only where the integration lives, and modules a reader can hold."""

import ast
import pathlib

import attnkit

ROOT = pathlib.Path(attnkit.__file__).parent
#: lowest first: a package may import only packages at or below its own rank
ORDER = ["checks", "dtypes", "lang", "masks", "bias", "backends", "functional",
         "positional", "cache", "layers", "distributed", "seq2seq", "integrations", "bench",
         "viz",
         "tour", "cli", "fonts"]
RANK = {name: i for i, name in enumerate(ORDER)}


def _modules():
    return [f for f in sorted(ROOT.rglob("*.py")) if f.name != "__init__.py" or f.parent != ROOT]


def _imports(f: pathlib.Path):
    """(target top-level name, imported names) of every import inside the package."""
    rel = f.relative_to(ROOT).parts
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            here = list(rel[:-1])
            base = here[:len(here) - (node.level - 1)] if node.level > 1 else here
            path = base + (node.module.split(".") if node.module else [])
            top = path[0] if path else node.names[0].name
            yield top, path, [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("attnkit"):
            path = node.module.split(".")[1:]
            yield (path[0] if path else node.names[0].name), path, [a.name for a in node.names]


def test_imports_go_one_way():
    wrong = []
    for f in _modules():
        own = f.relative_to(ROOT).parts[0].removesuffix(".py")
        for top, _, _ in _imports(f):
            if top in RANK and own in RANK and RANK[top] > RANK[own]:
                wrong.append(f"{f.relative_to(ROOT)} imports {top}")
    assert not wrong, wrong


def test_no_private_names_cross_modules():
    wrong = []
    for f in _modules():
        for _, path, names in _imports(f):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            private += [p for p in path if p.startswith("_") and not p.startswith("__")]
            if private:
                wrong.append(f"{f.relative_to(ROOT)}: {private}")
    assert not wrong, wrong


def test_transformers_only_in_the_integration_and_the_bench():
    wrong = []
    for f in _modules():
        top = f.relative_to(ROOT).parts[0]
        if top in ("integrations", "bench"):
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == "transformers" for n in names):
                wrong.append(str(f.relative_to(ROOT)))
    assert not wrong, wrong


def test_no_module_is_over_500_lines():
    long = {str(f.relative_to(ROOT)): n for f in _modules()
            if (n := len(f.read_text().splitlines())) > 500}
    assert not long, long
