"""One glossary (README, "How it is built"): in the package's own names, ``kind`` is a loss
kind and nothing else. A statement's word is its ``keyword``, a token's or a line's class its
``category``, a model error's cause its ``reason``, the ``generator`` and ``align`` options are
called that. This scans the package's syntax trees (no import) for every name ``kind`` that code
defines: a parameter, a class field, an attribute set, a function or property, a local."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import vitkdl

PACKAGE = Path(vitkdl.__file__).parent

#: Where ``kind`` is defined and means a loss kind: the term nodes (the keyword a term is
#: written with), a plan entry, a probe's line, the registry lookups.
LOSS_KIND_SITES = {
    "vitkdl.nodes.TermSpec",
    "vitkdl.syntax.Term",
    "vitkdl.syntax._Build.term",  # the term's keyword token as parsed
    "vitkdl.terms.base.TermPlan",
    "vitkdl.probe.TermProbe",
    "vitkdl.spec._DistillTerms.kind",
    "vitkdl.terms.kind",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _mentions_registry(node: ast.AST | None) -> bool:
    """A value read from the registry of kinds (``KINDS[...]``, ``KINDS.get``, ...)."""
    if node is None:
        return False
    return any(
        (isinstance(n, ast.Name) and n.id == "KINDS")
        or (isinstance(n, ast.Attribute) and n.attr == "KINDS")
        for n in ast.walk(node)
    )


def _binds_kind(target: ast.AST) -> bool:
    return any(isinstance(n, ast.Name) and n.id == "kind" for n in ast.walk(target))


def _is_spec_literal(module: str, node: ast.AnnAssign) -> bool:
    """``kind: Literal["KEYWORD"] = "KEYWORD"`` in the spec of the kind ``vitkdl.terms.KEYWORD``
    (each kind declares its own keyword as its spec's ``kind``)."""
    parts = module.split(".")
    if len(parts) != 3 or parts[:2] != ["vitkdl", "terms"]:
        return False
    ann = node.annotation
    return (
        isinstance(ann, ast.Subscript)
        and isinstance(ann.value, ast.Name)
        and ann.value.id == "Literal"
        and isinstance(ann.slice, ast.Constant)
        and ann.slice.value == parts[2]
    )


class _KindNames(ast.NodeVisitor):
    """Every definition of a name ``kind`` in one module, with the scope it is in."""

    def __init__(self, module: str, path: Path) -> None:
        self.module, self.path = module, path
        self.scope: list[str] = []
        self.in_function: list[bool] = []
        self.found: list[str] = []

    def _where(self) -> str:
        return ".".join([self.module, *self.scope])

    def _report(self, node: ast.AST, what: str) -> None:
        where = self._where()
        if where not in LOSS_KIND_SITES:
            self.found.append(f"{self.path.name}:{getattr(node, 'lineno', '?')} {what} in {where}")

    def _scoped(self, node: ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.scope.append(node.name)
        self.in_function.append(not isinstance(node, ast.ClassDef))
        self.generic_visit(node)
        self.in_function.pop()
        self.scope.pop()

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for stmt in node.body:  # class fields and class attributes
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt]
            if any(
                isinstance(stmt, ast.AnnAssign | ast.Assign)
                and _binds_kind(getattr(t, "target", t))
                and not (isinstance(stmt, ast.AnnAssign) and _is_spec_literal(self.module, stmt))
                for t in targets
            ):
                self.scope.append(node.name)
                self._report(stmt, "field")
                self.scope.pop()
        self._scoped(node)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        if node.name == "kind":
            self.scope.append(node.name)
            self._report(node, "function")
            self.scope.pop()
        args = node.args
        for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
            if a is not None and a.arg == "kind":
                self.scope.append(node.name)
                self._report(a, "parameter")
                self.scope.pop()
        self._scoped(node)

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr == "kind" and isinstance(node.ctx, ast.Store):
            self._report(node, "attribute")
        self.generic_visit(node)

    def _local(self, target: ast.AST, value: ast.AST | None, node: ast.AST) -> None:
        in_function = bool(self.in_function) and self.in_function[-1]
        if in_function and _binds_kind(target) and not _mentions_registry(value):
            self._report(node, "local")

    def visit_Assign(self, node: ast.Assign) -> None:
        for target in node.targets:
            self._local(target, node.value, node)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self._local(node.target, node.value, node)
        self.generic_visit(node)

    def visit_For(self, node: ast.For) -> None:
        self._local(node.target, node.iter, node)
        self.generic_visit(node)

    def visit_comprehension(self, node: ast.comprehension) -> None:
        self._local(node.target, node.iter, node.iter)
        self.generic_visit(node)


def _kind_names() -> Iterator[str]:
    for path in sorted(PACKAGE.rglob("*.py")):
        visitor = _KindNames(_module_name(path), path)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        yield from visitor.found


def test_kind_names_only_a_loss_kind() -> None:
    found = list(_kind_names())
    assert not found, "`kind` used for something other than a loss kind:\n" + "\n".join(found)


def test_the_scan_sees_each_sort_of_definition(tmp_path: Path) -> None:
    """The scanner catches a parameter, a field, an attribute and a local named ``kind`` that
    are not loss kinds (so an empty scan above means something)."""
    source = (
        "class Tok:\n    kind: str\n"
        "class Other:\n    kind = 'x'\n"
        "def make(kind: str) -> None:\n    pass\n"
        "class Meter:\n    def __init__(self):\n        self.kind = 'rss'\n"
        "def split(m):\n    kind, index = m\n"
        "def lookup(t):\n    kind = KINDS[t]\n"
    )
    visitor = _KindNames("vitkdl.example", tmp_path / "example.py")
    visitor.visit(ast.parse(source))
    sorts = [line.split()[1] for line in visitor.found]
    assert sorts == ["field", "field", "parameter", "attribute", "local"]
