"""The recipes shipped with vitkdl (``recipes/`` in the repository, package data
``vitkdl.recipes`` when installed): listing them and copying one out to edit, with the recipes
it names by relative path (``extends``, ``teacher from``) so the copy still resolves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from vitkdl.errors import did_you_mean


class ShippedError(Exception):
    """A shipped recipe that does not exist, or a copy that would overwrite a file."""


def recipes_root() -> Traversable:
    """Where the shipped recipes are: the installed package data, else the source tree."""
    try:
        root = resources.files("vitkdl.recipes")
        if any(f.name.endswith(".vkd") for f in root.iterdir()):
            return root
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        pass
    return Path(__file__).resolve().parent.parent / "recipes"


def _walk(folder: Traversable, prefix: str = "") -> list[tuple[str, Traversable]]:
    out: list[tuple[str, Traversable]] = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.startswith((".", "_")):
            continue
        if entry.is_dir():
            out.extend(_walk(entry, f"{prefix}{entry.name}/"))
        elif entry.name.endswith(".vkd"):
            out.append((prefix + entry.name[: -len(".vkd")], entry))
    return out


@dataclass(frozen=True)
class Shipped:
    """One shipped recipe: its name (``quickstart``, ``base/deit_imagenet``), its first header
    comment line, and where it lives."""

    name: str
    description: str
    file: Traversable

    @property
    def text(self) -> str:
        return self.file.read_text(encoding="utf-8")


def _description(text: str) -> str:
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            return stripped.lstrip("#").strip()
        if stripped:
            break
    return ""


def shipped() -> list[Shipped]:
    """Every shipped recipe, by name."""
    return [
        Shipped(name, _description(f.read_text(encoding="utf-8")), f)
        for name, f in _walk(recipes_root())
    ]


def find(name: str) -> Shipped:
    """The shipped recipe ``name`` (``quickstart``, ``quickstart.vkd``,
    ``recipes/quickstart.vkd`` or ``base/deit_imagenet``)."""
    key = name.removeprefix("recipes/").removesuffix(".vkd")
    known = shipped()
    for r in known:
        if r.name == key:
            return r
    names = [r.name for r in known]
    hint = did_you_mean(key, names)
    raise ShippedError(
        f"no shipped recipe named '{name}'" + (f"; {hint}" if hint else "; see `vitkdl ls`")
    )


def dependencies(text: str) -> list[str]:
    """The relative paths a recipe names (``extends``, ``teacher from``), in order."""
    from vitkdl.syntax import parse

    return [
        st.arg
        for st in parse(text).statements
        if st.arg is not None and (st.keyword == "extends" or st.from_path)
    ]


@dataclass(frozen=True)
class Copied:
    """One file of a copy: from, to, and what happened (copied, unchanged, kept)."""

    source: str
    target: Path
    status: str


def copy(name: str, dest: str | Path, *, force: bool = False, deps: bool = True) -> list[Copied]:
    """Copy shipped recipe ``name`` to ``dest`` (a file, or a directory to copy into), with the
    recipes it names by relative path at the same relative places. Copied into a directory,
    the files keep the shipped layout below their common folder, so a dependency named
    ``../x.vkd`` lands inside ``dest`` too, never beside it. An existing ``dest`` is an error
    unless ``force``; an existing dependency is kept when it differs (``force`` replaces
    it). Every target is checked before anything is written."""
    recipe = find(name)
    into = str(dest).endswith(("/", "\\")) or Path(dest).is_dir()
    closure = _closure(recipe) if deps else [(recipe, recipe.name)]
    dest = Path(dest)
    if into:
        # The common folder of every file copied becomes ``dest``.
        folders = [n.split("/")[:-1] for _, n in closure]
        common = 0
        while all(len(f) > common and f[common] == folders[0][common] for f in folders):
            common += 1
        dest = dest / ("/".join(recipe.name.split("/")[common:]) + ".vkd")
    if dest.exists() and not force:
        raise ShippedError(f"{dest} exists; pass --force to overwrite it")
    targets = [(recipe, dest)]
    for dep, rel in closure[1:]:
        targets.append((dep, Path(os.path.normpath(dest.parent / rel))))
    for _, target in targets:
        _check_writable(target)
    out = [_write(recipe.name, recipe.text, dest, force=True)]
    out += [_write(d.name, d.text, t, force=force) for d, t in targets[1:]]
    return out


def _closure(recipe: Shipped) -> list[tuple[Shipped, str]]:
    """``recipe`` and the shipped recipes it names, transitively: each with its path relative
    to ``recipe``'s folder (the recipe itself with its shipped name)."""
    out = [(recipe, recipe.name)]
    todo = [(recipe, "")]
    seen = {recipe.name}
    while todo:
        current, where = todo.pop()
        base = current.name.rsplit("/", 1)[0] + "/" if "/" in current.name else ""
        for rel in dependencies(current.text):
            dep_name = _normalise(base + rel)
            if dep_name is None or dep_name in seen:
                continue
            seen.add(dep_name)
            try:
                dep = find(dep_name)
            except ShippedError:
                continue
            rel_to_recipe = _join(where, rel)
            out.append((dep, rel_to_recipe))
            todo.append((dep, rel_to_recipe.rsplit("/", 1)[0] if "/" in rel_to_recipe else ""))
    return out


def _join(folder: str, rel: str) -> str:
    """``folder/rel`` with ``..`` resolved where it can be (leading ones kept)."""
    parts = [p for p in folder.split("/") if p]
    for p in rel.split("/"):
        if p in ("", "."):
            continue
        if p == ".." and parts and parts[-1] != "..":
            parts.pop()
        else:
            parts.append(p)
    return "/".join(parts)


def _check_writable(target: Path) -> None:
    """A target whose folder is a file (``afile/x.vkd``) or that is a folder is a clean error."""
    if target.is_dir():
        raise ShippedError(f"{target} is a folder; name a file, or end DEST with /")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ShippedError(f"cannot write {target}: {parent} is a file, not a folder")
            break


def _normalise(path: str) -> str | None:
    parts: list[str] = []
    for p in path.removesuffix(".vkd").split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(p)
    return "/".join(parts)


def _write(name: str, text: str, target: Path, *, force: bool) -> Copied:
    if target.exists():
        if target.read_text(encoding="utf-8") == text:
            return Copied(name, target, "unchanged")
        if not force:
            return Copied(name, target, "kept")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    return Copied(name, target, "copied")
