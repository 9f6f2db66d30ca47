"""The shipped recipes: listed with their descriptions, copied out with their dependencies."""

from __future__ import annotations

import pytest

import vitkdl
from tests.conftest import RECIPES
from vitkdl.shipped import ShippedError, copy, dependencies, find, recipes_root, shipped


def test_every_shipped_recipe_is_listed_with_its_first_header_line() -> None:
    listed = {r.name: r.description for r in shipped()}
    on_disk = {
        str(p.relative_to(RECIPES).with_suffix(""))
        for p in RECIPES.rglob("*.vkd")
        if not p.name.startswith(".")
    }
    assert set(listed) == on_disk
    assert listed["quickstart"].startswith("Quickstart: ViTKD + NKD on the embedded digits")
    assert listed["base/deit_imagenet"].startswith("Base recipe:")
    assert all(listed.values())
    assert (recipes_root() / "quickstart.vkd").is_file()


def test_every_shipped_recipe_is_in_the_wheels_package_data() -> None:
    """A recipe folder missing from pyproject's package data is in a checkout and not in an
    installed wheel (recipes/methods once was)."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((RECIPES.parent / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["vitkdl.recipes"]
    for path in RECIPES.rglob("*.vkd"):
        name = path.relative_to(RECIPES).as_posix()
        matched = any(fnmatch.fnmatch(name, g) and g.count("/") == name.count("/") for g in globs)
        assert matched, name


def test_names_resolve_with_or_without_suffix_and_folder() -> None:
    for name in ("quickstart", "quickstart.vkd", "recipes/quickstart.vkd"):
        assert find(name).name == "quickstart"
    with pytest.raises(ShippedError, match="did you mean 'quickstart'"):
        find("quikstart")


def test_copy_brings_the_recipes_it_names(tmp_path, monkeypatch) -> None:
    done = copy("quickstart", tmp_path / "exp" / "mine.vkd")
    assert [(c.source, c.target.relative_to(tmp_path).as_posix(), c.status) for c in done] == [
        ("quickstart", "exp/mine.vkd", "copied"),
        ("quickstart_baseline", "exp/quickstart_baseline.vkd", "copied"),
        ("quickstart_teacher", "exp/quickstart_teacher.vkd", "copied"),
    ]
    monkeypatch.chdir(tmp_path)
    spec, diags, _ = vitkdl.validate("exp/mine.vkd")
    assert spec is not None and not [d for d in diags if d.is_error]
    original = vitkdl.validate(RECIPES / "quickstart.vkd")[0]
    assert spec.teacher.from_recipe == "exp/quickstart_teacher.vkd"
    assert spec.teacher.from_hash == original.teacher.from_hash  # the same teacher recipe
    copied, shipped_data = spec.canonical(), original.canonical()
    for data in (copied, shipped_data):
        data["teacher"].pop("from_recipe")
    assert copied == shipped_data


def test_copy_into_a_folder_keeps_relative_layout_and_never_clobbers(tmp_path) -> None:
    done = copy("deit_tiny_vitkd_kd", f"{tmp_path}/")
    assert [c.target.relative_to(tmp_path).as_posix() for c in done] == [
        "deit_tiny_vitkd_kd.vkd",
        "base/deit_imagenet.vkd",
    ]
    with pytest.raises(ShippedError, match="exists; pass --force"):
        copy("deit_tiny_vitkd_kd", tmp_path)
    mine = tmp_path / "base" / "deit_imagenet.vkd"
    mine.write_text(mine.read_text() + "# mine\n")
    again = copy("deit_small_vitkd_kd", tmp_path)
    assert [c.status for c in again] == ["copied", "kept"]
    assert mine.read_text().endswith("# mine\n")
    forced = copy("deit_small_vitkd_kd", tmp_path, force=True)
    assert [c.status for c in forced] == ["unchanged", "copied"]
    assert not mine.read_text().endswith("# mine\n")


def test_copy_into_a_folder_keeps_dependencies_above_the_recipe_inside_it(tmp_path) -> None:
    # ablations/mask extends "../deit_tiny_vitkd.vkd": copied into a folder, the shipped
    # layout below the files' common folder is kept, so nothing lands beside DEST.
    dest = tmp_path / "abl"
    done = copy("ablations/mask", f"{dest}/")
    assert [c.target.relative_to(dest).as_posix() for c in done] == [
        "ablations/mask.vkd",
        "deit_tiny_vitkd.vkd",
        "base/deit_imagenet.vkd",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abl"]
    spec, diags, _ = vitkdl.validate(dest / "ablations" / "mask.vkd")
    assert spec is not None and not [d for d in diags if d.is_error]


def test_copy_under_a_file_is_a_clean_error_that_writes_nothing(tmp_path) -> None:
    (tmp_path / "afile").write_text("")
    with pytest.raises(ShippedError, match="afile is a file, not a folder"):
        copy("quickstart", tmp_path / "afile" / "x.vkd")
    # a dependency's folder that is a file: checked before the recipe itself is written
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "base").write_text("")
    with pytest.raises(ShippedError, match="base is a file, not a folder"):
        copy("deit_tiny_vitkd_kd", tmp_path / "exp" / "mine.vkd")
    assert not (tmp_path / "exp" / "mine.vkd").exists()


def test_dependencies_are_the_extends_and_teacher_from_paths() -> None:
    assert dependencies(find("quickstart").text) == [
        "quickstart_baseline.vkd",
        "quickstart_teacher.vkd",
    ]
    assert dependencies(find("deit_base_vitkd").text) == ["base/deit_imagenet.vkd"]
    assert dependencies(find("quickstart_teacher").text) == []
