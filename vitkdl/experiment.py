"""Experiments: recipes over the cells of a grid and over seeds, as ordinary runs, judged
together.

An experiment is what ``vitkdl run`` does with ``--seeds``, ``--grid`` or a recipe's ``sweep``
block (a plain ``vitkdl run R`` is the experiment of one cell and the recipe's seed)::

    sweep {
        distill.generate.mask = [0.25, 0.5, 0.75]    # an axis: a --set path and its values
        seeds = [0, 1, 2]                            # every cell runs with each seed
    }

The same from the command line: ``--grid distill.generate.mask=0.25,0.5,0.75 --seeds 0-2``
(``--grid`` adds an axis or replaces the block's axis of that path; ``--seeds`` replaces the
block's seeds). A *cell* is one combination of the axes' values (their cartesian product);
each cell runs once per seed, and every such run is an ordinary run: the recipe with
``--set PATH=VALUE`` for each axis and ``train.seed=SEED``, in its own folder, keyed by its
hash (:mod:`vitkdl.runs`), reused when finished. Values are checked like ``--set``: every
(cell, seed) is loaded and checked, and a problem points at the value in the sweep block (or in
``--grid`` / ``--seeds``). Dependencies (``teacher from``) run once, shared by every cell and
seed; a recipe's baseline (the student-only recipe it extends) runs under the same cell values
that reach it (``student.*``, ``data.*``, ``train.*``) and the same seeds.

Planning (:func:`plan_experiment`) gives the runs in dependency order and the *arms*, a recipe
under one cell over the seeds: the rows of the report. :func:`assemble_report` turns the runs'
summaries into the report's data: per seed, mean and standard deviation per arm, and the paired
comparison of every arm with its baseline (:mod:`vitkdl.stats`).

Torch-free: this is the language side of experiments (the runner is
:mod:`vitkdl.train.jobs`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from vitkdl import syntax as syn
from vitkdl.errors import Diagnostic, Sources, Span, VkdError, error
from vitkdl.runs import run_dir, stopped_early
from vitkdl.spec import Assignment, RecipeSpec, load_spec, split_op
from vitkdl.spec import _display as _display  # the name a recipe's spans carry
from vitkdl.stats import paired, sample

#: The sweep item that lists the seeds, and the field it sets.
SEEDS = "seeds"
SEED_PATH = "train.seed"

#: Override roots that carry over to a recipe's student-only baseline. Overrides of the
#: teacher and the distill terms have nothing to act on there, and ``recipe.name`` would give
#: the baseline the recipe's own name.
BASELINE_ROOTS = ("student", "data", "train")

#: What a report compares: the final top-1 of each run.
METRIC = "top1"

Role = Literal["recipe", "baseline", "teacher"]


# --------------------------------------------------------------------------------------------
# Baselines and smoke runs


def baseline_overrides(overrides: Sequence[str]) -> tuple[str, ...]:
    """The overrides given for a run that apply to its baseline as well (same seed, epochs,
    data root, student settings), so that the comparison is like with like."""
    return tuple(o for o in overrides if _root(o.split("=", 1)[0]) in BASELINE_ROOTS)


def _root(path: str) -> str:
    return split_op(path)[1].split(".")[0]


def baseline_of(spec: RecipeSpec) -> str | None:
    """The baseline of a recipe with a teacher: the nearest recipe it extends (directly, or
    through others, as an ablation extends a distillation recipe that extends a baseline)
    that is a complete student-only recipe; None when there is none."""
    if spec.teacher is None:
        return None
    for path in spec.extends:
        base, diags, _ = load_spec(path)
        if base is None or any(d.is_error for d in diags):
            return None
        if base.student is not None and base.teacher is None:
            return path
    return None


def smoke_overrides(spec: RecipeSpec, given: Sequence[str] = ()) -> list[str]:
    """Synthetic data of the recipe's own shapes, a small batch, a few steps; less the paths
    the user ``given`` sets (theirs count, and the same path twice is an error)."""
    batch = min(spec.data.batch_size, 8)
    theirs = {split_op(o.split("=", 1)[0])[1] for o in given}
    smoke = [
        "data.source=synthetic",
        f"data.batch_size={batch}",
        f"data.size={batch * 4}",
        "data.workers=0",
        "train.epochs=1",
        "train.eval_every=1",
    ]
    return [o for o in smoke if o.split("=", 1)[0] not in theirs]


# --------------------------------------------------------------------------------------------
# Grids: axes from a sweep block, --grid and --seeds


@dataclass(frozen=True)
class Axis:
    """One axis of a grid: a ``--set`` path and its values, each positioned where written."""

    path: str
    values: tuple[Assignment, ...]
    span: Span

    @property
    def texts(self) -> tuple[str, ...]:
        return tuple(v.text for v in self.values)


@dataclass(frozen=True)
class Cell:
    """One combination of the axes' values (empty for a recipe without axes)."""

    values: tuple[Assignment, ...] = ()

    @property
    def label(self) -> str:
        """``mask=0.25 lr=5e-4``: each axis by the last part of its path."""
        return " ".join(f"{short_path(v.path)}={v.text}" for v in self.values)

    @property
    def overrides(self) -> tuple[str, ...]:
        return tuple(v.override for v in self.values)


def short_path(path: str) -> str:
    """An axis path as a report names it: ``distill.generate.mask`` -> ``generate.mask``."""
    parts = path.split(".")
    return ".".join(parts[-2:]) if parts[0] == "distill" else parts[-1]


@dataclass(frozen=True)
class Grid:
    """The axes of an experiment and its seeds (None: each run keeps its recipe's seed)."""

    axes: tuple[Axis, ...] = ()
    seeds: Axis | None = None

    def cells(self) -> list[Cell]:
        """Every combination of the axes' values, the first axis varying slowest."""
        return [Cell(tuple(c)) for c in itertools.product(*(a.values for a in self.axes))]

    @property
    def seed_values(self) -> list[Assignment | None]:
        return list(self.seeds.values) if self.seeds is not None else [None]

    @property
    def empty(self) -> bool:
        return not self.axes and self.seeds is None


def _text_at(span: Span, sources: Sources) -> str:
    """The source text a span covers."""
    lines = sources.texts.get(span.file, "").splitlines()
    if not lines or span.line > len(lines):
        return ""
    if span.line == span.end_line:
        return lines[span.line - 1][span.column - 1 : span.end_column - 1]
    parts = [lines[span.line - 1][span.column - 1 :]]
    parts += lines[span.line : span.end_line - 1]
    parts.append(lines[span.end_line - 1][: span.end_column - 1])
    return " ".join(p.strip() for p in parts)


def _axis(
    path: str, span: Span, values: Sequence[syn.Value], sources: Sources, diags: list[Diagnostic]
) -> Axis | None:
    if not values:
        diags.append(error(f"the axis {path} has no values", span, hint=f"{path} = [v1, v2]"))
        return None
    seen: dict[str, syn.Value] = {}
    items = []
    for v in values:
        text = _text_at(v.span, sources)
        if text in seen:
            diags.append(error(f"{text} is listed twice for {path}", v.span))
            continue
        seen[text] = v
        items.append(Assignment(path, v, span, text))
    return Axis(path, tuple(items), span)


def _seed_axis(
    span: Span, values: Sequence[syn.Value], sources: Sources, diags: list[Diagnostic]
) -> Axis | None:
    """The seeds as an axis of ``train.seed``; each must be a whole number (the range is
    checked where every run is loaded, like any value)."""
    whole = []
    for v in values:
        if isinstance(v, syn.Number) and isinstance(v.value, int):
            whole.append(v)
        else:
            got = _text_at(v.span, sources)
            diags.append(error(f"a seed is a whole number, got {got}", v.span))
    return _axis(SEED_PATH, span, whole, sources, diags) if whole else None


def read_sweep(
    path: str | Path, sources: Sources, text: str | None = None
) -> tuple[Grid, list[Diagnostic]]:
    """The grid a recipe's ``sweep`` block declares (empty without one). Only the file's own
    block counts: a sweep is not inherited through ``extends``. The file's syntax errors are
    left to the loading of the recipe (empty grid)."""
    diags: list[Diagnostic] = []
    try:
        text = syn.read_source(path) if text is None else text
        if "sweep" not in text:  # most recipes: no need to parse them again
            return Grid(), []
        tree = syn.parse(text, _display(Path(path)))
    except VkdError:
        return Grid(), []
    sources.add(tree.file, text)
    sweeps = [st for st in tree.statements if st.keyword == "sweep"]
    if not sweeps:
        return Grid(), []
    axes: list[Axis] = []
    seeds: Axis | None = None
    seen: dict[str, Span] = {}
    for f in sweeps[0].fields:  # a second sweep block is the spec's error
        if f.name in seen:
            first = seen[f.name]
            diags.append(
                error(
                    f"{f.name} is swept twice",
                    f.name_span,
                    hint=f"first at {first.line}:{first.column}; list every value there",
                )
            )
            continue
        seen[f.name] = f.name_span
        if not isinstance(f.value, syn.List):
            diags.append(
                error(
                    f"a sweep axis is a list of values, got {_text_at(f.value.span, sources)}",
                    f.value.span,
                    hint=f"{f.name} = [{_text_at(f.value.span, sources)}, ...]",
                )
            )
            continue
        if f.name == SEEDS:
            seeds = _seed_axis(f.name_span, f.value.items, sources, diags)
        elif f.name == SEED_PATH:
            diags.append(
                error(
                    "the seeds of a sweep are listed as seeds = [...]",
                    f.name_span,
                    hint="seeds = [0, 1, 2]: every cell runs with each seed",
                )
            )
        else:
            axis = _axis(f.name, f.name_span, f.value.items, sources, diags)
            if axis is not None:
                axes.append(axis)
    return Grid(tuple(axes), seeds), diags


def _split_top(text: str) -> list[tuple[int, str]]:
    """``text`` split at the commas outside brackets, parentheses and strings: (offset,
    piece) pairs."""
    pieces: list[tuple[int, str]] = []
    depth, quoted, start = 0, False, 0
    i = 0
    while i < len(text):
        c = text[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        elif c == "," and depth == 0:
            pieces.append((start, text[start:i]))
            start = i + 1
        i += 1
    pieces.append((start, text[start:]))
    return pieces


def _cli_span(source: str, line: int, column: int, length: int) -> Span:
    return Span(
        file=source, line=line, column=column, end_line=line, end_column=column + max(1, length)
    )


def parse_grid(args: Sequence[str], sources: Sources) -> tuple[list[Axis], list[Diagnostic]]:
    """``--grid PATH=v1,v2,...`` arguments as axes (values in the recipe's value syntax, or
    taken as written like ``--set`` does); problems point into the ``--grid`` arguments."""
    source = "--grid"
    sources.add(source, "\n".join(args))
    axes: list[Axis] = []
    diags: list[Diagnostic] = []
    seen: dict[str, int] = {}
    for i, arg in enumerate(args):
        line = i + 1
        if "=" not in arg:
            diags.append(
                error(
                    f"a grid axis is PATH=v1,v2,..., got '{arg}'",
                    _cli_span(source, line, 1, len(arg)),
                    hint="e.g. --grid distill.generate.mask=0.25,0.5,0.75",
                )
            )
            continue
        path, rest = arg.split("=", 1)
        path_span = _cli_span(source, line, 1, len(path))
        op, bare = split_op(path)
        if op == "~":
            diags.append(
                error(
                    "a grid axis sets values; ~PATH (remove) is not one",
                    path_span,
                    hint=f"run the recipe with and without it: --set ~{bare} in a second run",
                )
            )
            continue
        if bare in seen:
            first = seen[bare]
            diags.append(
                error(
                    f"{bare} is given twice: --grid {args[first]} and --grid {arg}",
                    path_span,
                    hint=f"the first is --grid argument {first + 1}; list every value there",
                )
            )
            continue
        seen[bare] = i
        values: list[syn.Value] = []
        for offset, piece in _split_top(rest):
            lead = len(piece) - len(piece.lstrip())
            piece = piece.strip()
            column = len(path) + 2 + offset + lead
            if not piece:
                diags.append(error("an empty value in --grid", _cli_span(source, line, column, 1)))
                continue
            try:
                value = syn.move(syn.parse_value(piece, source, column=column), line=line)
            except VkdError:  # as written, like --set data.root=/data/imagenet
                value = syn.String(piece, _cli_span(source, line, column, len(piece)))
            values.append(value)
        if bare == SEED_PATH:
            diags.append(error("the seeds are given with --seeds", path_span, hint="--seeds 0-4"))
            continue
        axis = _axis(path.strip(), path_span, values, sources, diags)
        if axis is not None:
            axes.append(axis)
    return axes, diags


def parse_seeds(text: str, sources: Sources) -> tuple[Axis | None, list[Diagnostic]]:
    """``--seeds 0,1,2``, ``--seeds 0-4`` or a mix (``0-2,7``) as the seed axis; problems
    point into the ``--seeds`` argument."""
    source = "--seeds"
    sources.add(source, text)
    diags: list[Diagnostic] = []
    values: list[syn.Value] = []
    for offset, piece in _split_top(text):
        lead = len(piece) - len(piece.lstrip())
        piece = piece.strip()
        column = offset + lead + 1
        span = _cli_span(source, 1, column, len(piece))
        lo, dash, hi = piece.partition("-")
        try:
            if dash and lo.strip():
                first, last = int(lo), int(hi)
                if last < first:
                    diags.append(error(f"the range {piece} runs backwards", span))
                    continue
                values += [syn.Number(s, span) for s in range(first, last + 1)]
            else:
                values.append(syn.Number(int(piece), span))
        except ValueError:
            diags.append(
                error(
                    f"seeds are whole numbers or ranges, got '{piece}'",
                    span,
                    hint="e.g. --seeds 0,1,2 or --seeds 0-4",
                )
            )
    if diags:
        return None, diags
    # Each seed's text is its number (a range gives several values at one span).
    items = tuple(
        Assignment(SEED_PATH, v, _cli_span(source, 1, 1, len(text)), str(v.value))
        for v in values
        if isinstance(v, syn.Number)
    )
    texts = [a.text for a in items]
    twice = sorted({t for t in texts if texts.count(t) > 1}, key=int)
    if twice:
        diags.append(
            error(f"seed {', '.join(twice)} is listed twice", _cli_span(source, 1, 1, len(text)))
        )
        return None, diags
    return Axis(SEED_PATH, items, _cli_span(source, 1, 1, len(text))), diags


def combine(
    block: Grid,
    grid: Sequence[Axis],
    seeds: Axis | None,
    overrides: Sequence[str],
    sources: Sources,
) -> tuple[Grid, list[Diagnostic]]:
    """The grid of one recipe: its sweep block's, with ``--grid`` axes added (replacing the
    block's axis of the same path) and ``--seeds`` replacing its seeds. A path that is both
    swept and ``--set`` is an error at the ``--set``."""
    axes = {split_op(a.path)[1]: a for a in block.axes}
    for a in grid:
        axes[split_op(a.path)[1]] = a
    grid_out = Grid(tuple(axes.values()), seeds if seeds is not None else block.seeds)
    diags: list[Diagnostic] = []
    swept = set(axes) | ({SEED_PATH} if grid_out.seeds else set())
    if overrides and swept:
        sources.add("--set", "\n".join(overrides))
    for i, text in enumerate(overrides):
        path = split_op(text.split("=", 1)[0])[1]
        if path in swept:
            how = "--seeds N" if path == SEED_PATH else f"--grid {path}=VALUE"
            diags.append(
                error(
                    f"{path} is swept" + (" (the seeds)" if path == SEED_PATH else ""),
                    _cli_span("--set", i + 1, 1, len(path)),
                    hint=f"to run one value, give it alone: {how}",
                )
            )
    return grid_out, diags


# --------------------------------------------------------------------------------------------
# Checking every cell


def _load_checked(
    path: str | Path,
    overrides: Sequence[str],
    sources: Sources,
    assignments: Sequence[Assignment],
    strict: bool,
    text: str | None = None,
    known: Sequence[Diagnostic] = (),
) -> tuple[RecipeSpec | None, list[Diagnostic]]:
    """Load and check one run of a recipe (what ``vitkdl.validate`` does for it). A problem
    that the values cause away from where they were written (a block index out of range
    under ``student.depth = [...]``) names them in its help; ``known`` (the recipe's own
    problems) are left as they are."""
    from vitkdl.checks import run_checks

    spec, diags, _ = load_spec(path, overrides, sources, text=text, assignments=assignments)
    if spec is not None and spec.student is not None:
        diags = diags + run_checks(spec, strict=strict)[1]
    written = {a.value.span for a in assignments} | {a.path_span for a in assignments}
    label = Cell(tuple(assignments)).label
    seen = {(d.severity, d.message, d.span) for d in known}
    out = []
    for d in diags:
        if assignments and d.span not in written and (d.severity, d.message, d.span) not in seen:
            d = replace(d, hint=(f"{d.hint}; " if d.hint else "") + f"in the cell {label}")
        out.append(d)
    return spec, out


class _Diags:
    """Diagnostics collected once each (every cell of a grid repeats the recipe's own)."""

    def __init__(self, known: Sequence[Diagnostic] = ()) -> None:
        self.items: list[Diagnostic] = []
        self.seen = {(d.severity, d.message, d.span) for d in known}

    def extend(self, diags: Sequence[Diagnostic]) -> None:
        for d in diags:
            key = (d.severity, d.message, d.span)
            if key not in self.seen:
                self.seen.add(key)
                self.items.append(d)

    @property
    def errors(self) -> bool:
        return any(d.is_error for d in self.items)


def check_sweep(
    path: str | Path,
    overrides: Sequence[str],
    sources: Sources,
    *,
    strict: bool = False,
    text: str | None = None,
    known: Sequence[Diagnostic] = (),
) -> list[Diagnostic]:
    """The problems of a recipe's ``sweep`` block (what ``vitkdl validate`` adds for it):
    the block's own, then every cell and every seed loaded and checked like ``--set`` would
    be, each problem at the value that causes it. ``known``: diagnostics already reported."""
    block, block_diags = read_sweep(path, sources, text)
    out = _Diags(known)
    out.extend(block_diags)
    grid, more = combine(block, (), None, overrides, sources)
    out.extend(more)
    if grid.empty:
        return out.items
    seeds = grid.seed_values
    cells = grid.cells()
    # Every cell with the first seed, and every other seed with the first cell: a value's
    # problems do not depend on the seed.
    runs = [(c, seeds[0]) for c in cells] + [(cells[0], s) for s in seeds[1:]]
    for cell, seed in runs:
        values = [*cell.values, *([seed] if seed is not None else [])]
        out.extend(_load_checked(path, overrides, sources, values, strict, text, known)[1])
    return out.items


# --------------------------------------------------------------------------------------------
# Planning: the runs of an experiment and the arms of its report


@dataclass(frozen=True)
class PlannedRun:
    """One run an experiment needs: a recipe under overrides, in its own folder."""

    key: str  # the run folder's name, NAME-HASH
    path: str  # the recipe file
    recipe: str
    hash: str
    overrides: tuple[str, ...]
    role: Role
    deps: tuple[str, ...] = ()  # keys of the runs that must finish first
    max_steps: int | None = None
    seed: int = 0
    cell: str = ""

    @property
    def label(self) -> str:
        """How progress lines and the report name the run."""
        parts = [self.recipe]
        if self.cell:
            parts.append(self.cell)
        if self.role != "teacher":
            parts.append(f"seed {self.seed}")
        return " ".join(parts)

    def folder(self, out_root: Path) -> Path:
        return run_dir(out_root, self.recipe, self.hash)


@dataclass(frozen=True)
class Arm:
    """A recipe under one cell, over the seeds: one row of the report."""

    recipe: str
    path: str
    cell: str
    values: tuple[tuple[str, str], ...]  # (axis path, value as written)
    role: Role
    runs: tuple[tuple[int, str], ...]  # (seed, run key), in the order of the seeds
    baseline: int | None = None  # the arm it is compared with (an index into the arms)

    @property
    def label(self) -> str:
        return f"{self.recipe} {self.cell}".strip()


@dataclass(frozen=True)
class Experiment:
    """The runs of an experiment, dependencies first, and the arms its report compares."""

    runs: tuple[PlannedRun, ...]
    arms: tuple[Arm, ...]
    seeds: tuple[int, ...] | None  # None: every run kept its recipe's seed
    axes: tuple[tuple[str, tuple[str, ...]], ...]  # (path, values as written) of every axis
    overrides: tuple[str, ...]  # the --set every run of the named recipes was given
    teachers: tuple[str, ...] = ()  # keys of the runs the named recipes take a teacher from
    recipes: tuple[str, ...] = ()  # the names of the recipes named on the command line

    @property
    def label(self) -> str:
        """The experiment's name: its recipes, in order."""
        return "+".join(self.recipes) or "experiment"

    def hash(self) -> str:
        """A short hash of what the experiment is made of (its arms' runs)."""
        data = [[a.recipe, a.cell, a.role, [list(r) for r in a.runs]] for a in self.arms]
        return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]

    def run(self, key: str) -> PlannedRun:
        return next(r for r in self.runs if r.key == key)


@dataclass
class _Planner:
    overrides: tuple[str, ...]
    sources: Sources
    strict: bool
    max_steps: int | None
    smoke: bool
    baseline: bool
    diags: _Diags = field(default_factory=_Diags)
    runs: dict[str, PlannedRun] = field(default_factory=dict)
    teachers: list[str] = field(default_factory=list)
    known: dict[tuple[str, tuple[str, ...]], list[Diagnostic]] = field(default_factory=dict)
    dependencies: dict[str, str | None] = field(default_factory=dict)

    def add(self, run: PlannedRun) -> str:
        """Keep ``run`` (once per folder: a baseline shared by two cells runs once, as far as
        the furthest of them asks)."""
        old = self.runs.get(run.key)
        if old is None:
            self.runs[run.key] = run
        elif old.max_steps is not None and (run.max_steps is None or run.max_steps > old.max_steps):
            self.runs[run.key] = replace(old, max_steps=run.max_steps)
        return run.key

    def dependency(self, path: str, stack: tuple[str, ...] = ()) -> str | None:
        """The run of a ``teacher from`` recipe, as written there (no overrides), after its
        own dependencies (planned once per recipe file)."""
        if path not in self.dependencies:
            self.dependencies[path] = self._dependency(path, stack)
        return self.dependencies[path]

    def _dependency(self, path: str, stack: tuple[str, ...]) -> str | None:
        spec, diags = _load_checked(path, (), self.sources, (), self.strict)
        self.diags.extend(diags)
        if spec is None or any(d.is_error for d in diags):
            return None
        deps = self._teacher(spec, (*stack, path))
        key = f"{spec.name}-{spec.hash()}"
        # --max-steps reaches teachers too: a bounded command is a quick pass over the graph.
        return self.add(
            PlannedRun(
                key,
                path,
                spec.name,
                spec.hash(),
                (),
                "teacher",
                deps,
                self.max_steps,
                spec.train.seed,
            )
        )

    def _teacher(self, spec: RecipeSpec, stack: tuple[str, ...] = ()) -> tuple[str, ...]:
        t = spec.teacher
        if t is None or t.from_recipe is None or self.smoke or t.from_recipe in stack:
            return ()
        key = self.dependency(t.from_recipe, stack)
        if key is not None and key not in self.teachers:
            self.teachers.append(key)
        return (key,) if key is not None else ()

    def own(self, path: str, overrides: Sequence[str]) -> list[Diagnostic]:
        """The recipe's own problems (under ``overrides``), reported once, not per cell."""
        key = (path, tuple(overrides))
        if key not in self.known:
            self.known[key] = _load_checked(path, overrides, self.sources, (), self.strict)[1]
            self.diags.extend(self.known[key])
        return self.known[key]

    def recipe(
        self,
        path: str,
        overrides: Sequence[str],
        cell: Cell,
        seed: Assignment | None,
        role: Role,
    ) -> tuple[PlannedRun, RecipeSpec] | None:
        values = [*cell.values, *([seed] if seed is not None else [])]
        known = self.own(path, overrides)
        spec, diags = _load_checked(path, overrides, self.sources, values, self.strict, None, known)
        self.diags.extend(diags)
        if spec is None or any(d.is_error for d in diags):
            return None
        deps = self._teacher(spec)
        run = PlannedRun(
            key=f"{spec.name}-{spec.hash()}",
            path=path,
            recipe=spec.name,
            hash=spec.hash(),
            overrides=tuple(spec.overrides),
            role=role,
            deps=deps,
            max_steps=self.max_steps,
            seed=spec.train.seed,
            cell=cell.label,
        )
        self.add(run)
        return run, spec


def plan_experiment(
    paths: Sequence[str | Path],
    overrides: Sequence[str] = (),
    grid: Sequence[str] = (),
    seeds: str | None = None,
    *,
    max_steps: int | None = None,
    smoke: bool = False,
    baseline: bool = True,
    strict: bool = True,
) -> tuple[Experiment, Sources]:
    """Plan the runs of an experiment: each recipe (with its sweep block) under ``--grid``
    axes and ``--seeds``, its dependencies and its baseline. Every run is loaded and checked;
    :class:`VkdError` carries every problem (positioned at the value that causes it) before
    anything trains."""
    sources = Sources()
    cli_axes, diags = parse_grid(grid, sources) if grid else ([], [])
    seed_axis = None
    if seeds is not None:
        seed_axis, more = parse_seeds(seeds, sources)
        diags += more
    planner = _Planner(tuple(overrides), sources, strict and not smoke, max_steps, smoke, baseline)
    planner.diags.extend(diags)
    if planner.diags.errors:
        raise VkdError(planner.diags.items, sources)
    arms: list[Arm] = []
    axes: dict[str, tuple[str, ...]] = {}
    names: list[str] = []
    for path in map(str, paths):
        block, more = read_sweep(path, sources)
        planner.diags.extend(more)
        recipe_grid, more = combine(block, cli_axes, seed_axis, overrides, sources)
        planner.diags.extend(more)
        for a in recipe_grid.axes:
            axes.setdefault(a.path, a.texts)
        # A --set of a swept path is combine's error: the cells do not apply it again.
        swept = {split_op(a.path)[1] for a in recipe_grid.axes}
        own = [o for o in overrides if split_op(o.split("=", 1)[0])[1] not in swept]
        if smoke:
            probe, probe_diags, _ = load_spec(path, own, sources)
            if probe is None:
                planner.diags.extend(probe_diags)
                continue
            own = smoke_overrides(probe, own) + own
        base_path: str | None = None
        for cell in recipe_grid.cells():
            recipe_runs: list[PlannedRun] = []
            base_runs: list[PlannedRun] = []
            # What of the cell reaches the baseline (student, data and train values).
            reach = Cell(tuple(v for v in cell.values if _root(v.path) in BASELINE_ROOTS))
            for seed in recipe_grid.seed_values:
                planned = planner.recipe(path, own, cell, seed, "recipe")
                if planned is None:
                    continue
                run, spec = planned
                recipe_runs.append(run)
                if run.recipe not in names:
                    names.append(run.recipe)
                if baseline and not smoke and base_path is None:
                    base_path = baseline_of(spec) or ""
                if not base_path:
                    continue
                base = planner.recipe(base_path, baseline_overrides(own), reach, seed, "baseline")
                if base is not None:
                    base_runs.append(base[0])
            if not recipe_runs:
                continue
            arm = Arm(
                recipe_runs[0].recipe,
                path,
                cell.label,
                tuple((v.path, v.text) for v in cell.values),
                "recipe",
                tuple((r.seed, r.key) for r in recipe_runs),
            )
            if base_runs and base_path:
                base_arm = Arm(
                    base_runs[0].recipe,
                    base_path,
                    reach.label,
                    tuple((v.path, v.text) for v in reach.values),
                    "baseline",
                    tuple((r.seed, r.key) for r in base_runs),
                )
                arm = replace(arm, baseline=_arm_index(arms, base_arm))
            _arm_index(arms, arm)
    if planner.diags.errors:
        raise VkdError(planner.diags.items, sources)
    seeds_out = (
        tuple(int(a.text) for a in seed_axis.values)
        if seed_axis is not None
        else _common_seeds(arms)
    )
    experiment = Experiment(
        runs=tuple(_ordered(planner.runs)),
        arms=tuple(arms),
        seeds=seeds_out,
        axes=tuple(axes.items()),
        overrides=tuple(overrides),
        teachers=tuple(planner.teachers),
        recipes=tuple(names),
    )
    return experiment, sources


def _common_seeds(arms: Sequence[Arm]) -> tuple[int, ...] | None:
    """The seeds every arm ran with, when they agree (a sweep block's seeds)."""
    seeds = {tuple(s for s, _ in a.runs) for a in arms}
    return next(iter(seeds)) if len(seeds) == 1 else None


def _arm_index(arms: list[Arm], arm: Arm) -> int:
    """The index of ``arm`` among ``arms``, adding it when new. An arm named on the command
    line and the baseline of another are one arm when they are the same runs (the baseline
    role wins, so the table shows what the others are compared with)."""
    for i, a in enumerate(arms):
        if a.runs == arm.runs:
            if arm.role == "baseline" and a.role != "baseline":
                arms[i] = replace(a, role="baseline")
            elif arm.baseline is not None and a.baseline is None:
                arms[i] = replace(a, baseline=arm.baseline)
            return i
    arms.append(arm)
    return len(arms) - 1


def _ordered(runs: dict[str, PlannedRun]) -> list[PlannedRun]:
    """The runs with every dependency before the runs that need it (otherwise in the order
    they were planned)."""
    out: list[PlannedRun] = []
    placed: set[str] = set()

    def place(key: str) -> None:
        if key in placed or key not in runs:
            return
        placed.add(key)
        for dep in runs[key].deps:
            place(dep)
        out.append(runs[key])

    for key in runs:
        place(key)
    return out


# --------------------------------------------------------------------------------------------
# The report's data


Status = Literal["done", "reused", "failed", "skipped", "preempted", "interrupted", "missing"]


@dataclass(frozen=True)
class Outcome:
    """What happened to one run of an experiment."""

    key: str
    status: Status
    message: str = ""
    seconds: float | None = None
    log: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("done", "reused")


def _status(outcome: Outcome | None) -> str:
    """A run's status in the report: ``done`` whether it trained now or before (the report of
    a finished experiment is the same however often it is run)."""
    if outcome is None:
        return "missing"
    return "done" if outcome.ok else outcome.status


def _value(summary: dict[str, Any] | None) -> float | None:
    if summary is None:
        return None
    v = summary.get(METRIC)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def assemble_report(
    experiment: Experiment,
    summaries: dict[str, dict[str, Any] | None],
    outcomes: dict[str, Outcome],
    out_root: Path,
) -> dict[str, Any]:
    """The report as plain data (what ``report.json`` holds): every arm's runs per seed with
    their folders and outcomes, its mean, standard deviation and the 95 % interval of its
    mean, and for every arm with a baseline the paired comparison (differences of runs that
    share a seed: mean, paired t interval, n, wins / ties / losses)."""
    arms_out: list[dict[str, Any]] = []
    for arm in experiment.arms:
        runs = []
        for seed, key in arm.runs:
            run = experiment.run(key)
            summary = summaries.get(key)
            outcome = outcomes.get(key)
            value = _value(summary) if outcome is None or outcome.ok else None
            runs.append(
                {
                    "seed": seed,
                    "folder": str(run.folder(out_root)),
                    METRIC: value,
                    "best_top1": (summary or {}).get("best_top1") if value is not None else None,
                    "ema_top1": (summary or {}).get("ema_top1") if value is not None else None,
                    "steps": (summary or {}).get("steps") if value is not None else None,
                    "wall_seconds": (summary or {}).get("wall_seconds")
                    if value is not None
                    else None,
                    "status": _status(outcome),
                    "message": outcome.message if outcome is not None else "",
                }
            )
        values = [r[METRIC] for r in runs if r[METRIC] is not None]
        entry: dict[str, Any] = {
            "recipe": arm.recipe,
            "label": arm.label,
            "cell": dict(arm.values),
            "role": arm.role,
            "runs": runs,
            "stats": sample(values).as_dict(),
            "baseline": arm.baseline,
        }
        arms_out.append(entry)
    for arm, entry in zip(experiment.arms, arms_out, strict=True):
        if arm.baseline is None:
            entry["vs_baseline"] = None
            continue
        base = arms_out[arm.baseline]
        pairs = [
            (r[METRIC], b[METRIC])
            for r, b in zip(entry["runs"], base["runs"], strict=False)
            if r[METRIC] is not None and b[METRIC] is not None
        ]
        comparison = paired([a for a, _ in pairs], [b for _, b in pairs]).as_dict()
        entry["vs_baseline"] = {"baseline": base["label"], **comparison}
    teachers = []
    for key in experiment.teachers:
        run = experiment.run(key)
        summary = summaries.get(key)
        outcome = outcomes.get(key)
        teachers.append(
            {
                "recipe": run.recipe,
                "folder": str(run.folder(out_root)),
                METRIC: _value(summary),
                "seed": run.seed,
                "status": _status(outcome),
            }
        )
    failed = [
        {
            "run": experiment.run(o.key).label,
            "folder": str(experiment.run(o.key).folder(out_root)),
            "status": o.status,
            "message": o.message,
            "log": o.log,
        }
        for o in outcomes.values()
        if not o.ok
    ]
    # Runs that --max-steps stopped before the end of their recipe (teachers included).
    early = [
        {"run": r.label, "note": note}
        for r in experiment.runs
        if (note := stopped_early(summaries.get(r.key) or {})) is not None
    ]
    return {
        "experiment": experiment.label,
        "hash": experiment.hash(),
        "metric": METRIC,
        "level": 0.95,
        "seeds": list(experiment.seeds) if experiment.seeds is not None else None,
        "axes": {p: list(v) for p, v in experiment.axes},
        "overrides": list(experiment.overrides),
        "teachers": teachers,
        "arms": arms_out,
        "not_ok": failed,
        "stopped_early": early,
    }
