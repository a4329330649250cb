"""The package's import graph, read from the source with `ast` (module-level and function-level
imports alike): library packages never import the command layer, and no module imports itself
back through a chain of imports (a circle, however lazy, means two modules own one concept).
Layers: layers/router/kernels -> models -> io -> generation/training -> parallel -> commands -> cli.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "qwen3moe"
LIBRARY = ("parallel", "training", "generation", "io", "models", "layers", "router", "kernels")
COMMAND_LAYER = ("qwen3moe.commands", "qwen3moe.cli")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def imports(path: Path, known: dict[str, Path], name: str | None = None) -> set[str]:
    """qwen3moe modules that module `name` (default: from its path) imports, at any depth (a
    `from pkg import name` counts `pkg.name` when that is a module, else `pkg`)."""
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # `if TYPE_CHECKING:` imports are annotations, not run
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(p, known) for m, p in known.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_library_never_imports_the_command_layer():
    g = graph()
    bad = sorted(f"{m} -> {t}" for m, ts in g.items() for t in ts
                 if m.split(".")[1:2] and m.split(".")[1] in LIBRARY
                 and any(t == c or t.startswith(c + ".") for c in COMMAND_LAYER))
    assert not bad, "library modules import the command layer:\n" + "\n".join(bad)


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checker_sees_lazy_and_relative_imports_and_cycles(tmp_path):
    """The walker counts imports inside functions and relative ones (not `if TYPE_CHECKING:`
    annotation imports), and the cycle finder reports a 2-cycle but not a chain."""
    src = tmp_path / "m.py"
    src.write_text("import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import qwen3moe.cli\n\n"
                   "def f():\n    from qwen3moe.commands.pretrain import run\n    from ..models import qwen3_moe\n")
    known = {"qwen3moe.commands.pretrain": src, "qwen3moe.models.qwen3_moe": src, "qwen3moe.parallel.m": src,
             "qwen3moe.cli": src}
    assert imports(src, known, "qwen3moe.parallel.m") == {"qwen3moe.commands.pretrain", "qwen3moe.models.qwen3_moe"}
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_library_never_prints():
    """print() and writes to sys.stdout / sys.stderr belong to the command layer: library code
    returns results, raises Qwen3MoeError subclasses, or logs through a callback it is given."""
    bad = []
    for name, path in sorted(modules().items()):
        if name.split(".")[1:2] and name.split(".")[1] in LIBRARY:
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                f = node.func if isinstance(node, ast.Call) else None
                if isinstance(f, ast.Name) and f.id == "print" or (
                        isinstance(f, ast.Attribute) and f.attr == "write" and isinstance(f.value, ast.Attribute)
                        and f.value.attr in ("stdout", "stderr")):
                    bad.append(f"{path.relative_to(PKG.parent)}:{node.lineno}")
    assert not bad, "library code prints:\n" + "\n".join(bad)


def progress_bar_calls_off_stderr(tree: ast.AST) -> list[int]:
    """Lines of tqdm(...) / tqdm.write(...) / bar.external_write_mode(...) calls without
    file=sys.stderr (tqdm.write's default is stdout; explicit everywhere keeps the rule checkable)."""
    def to_stderr(call: ast.Call) -> bool:
        return any(k.arg == "file" and isinstance(k.value, ast.Attribute) and k.value.attr == "stderr"
                   and isinstance(k.value.value, ast.Name) and k.value.value.id == "sys" for k in call.keywords)

    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        on_tqdm = isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "tqdm"
        if (name in ("tqdm", "trange", "external_write_mode") or (on_tqdm and name == "write")) and not to_stderr(node):
            bad.append(node.lineno)
    return bad


def test_progress_bars_write_to_stderr():
    """stdout carries generated text and results (JSON lines, `| head`): every tqdm bar and
    every write around it in qwen3moe/ goes to stderr."""
    bad = [f"{path.relative_to(PKG.parent)}:{line}" for _, path in sorted(modules().items())
           for line in progress_bar_calls_off_stderr(ast.parse(path.read_text(encoding="utf-8")))]
    assert not bad, "progress output not on stderr:\n" + "\n".join(bad)
    sample = ("import sys\nfrom tqdm import tqdm\nb = tqdm(total=3)\nc = tqdm(total=3, file=sys.stdout)\n"
              "tqdm.write('x')\nwith b.external_write_mode(file=sys.stderr):\n    pass\nd = tqdm(file=sys.stderr)\n")
    assert progress_bar_calls_off_stderr(ast.parse(sample)) == [3, 4, 5]  # the checker can fail
