"""Completion at a position of a recipe being typed (the contexts, without a server)."""

from __future__ import annotations

import pytest

from tests.conftest import RECIPES
from vitkdl import language
from vitkdl.lsp.analysis import definition, path_strings
from vitkdl.lsp.complete import complete, open_brackets, scan

HERE = RECIPES / "typing.vkd"


def labels(text_with_cursor: str) -> list[str]:
    offset = text_with_cursor.index("|")
    items, _ = complete(text_with_cursor.replace("|", "", 1), offset, HERE)
    return [i.label for i in items]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("|", list(language.statement_keywords())),
        ("recipe x\n|", list(language.statement_keywords())),
        ("recipe x\nstu|", ["student"]),
        (
            "student deit_tiny_patch16_224 {\n  |\n}",
            list(language.fields_of(language.block_models()["student"], "student")),
        ),
        ("student x {\n  pretrained = |\n}", ["false", "true"]),
        ("data |", ["imagefolder", "digits", "synthetic", "hfds", "wds"]),
        ("data imagefolder {\n  augment = |\n}", ["deit", "basic", "none"]),
        ("train {\n  precision = b|\n}", ["bf16"]),
        ("train {\n  optimizer = adamw(|)\n}", ["lr", "weight_decay"]),
        ("train {\n  optimizer = adamw(lr = 1e-3, w|)\n}", ["weight_decay"]),
        ("distill {\n  mimic student.|\n}", ["blocks", "norm", "fc_norm", "pre_logits"]),
        ("distill {\n  generate student.norm -> teacher.n|\n}", ["norm"]),
        (
            "distill {\n  mimic student.blocks[0] -> teacher.norm {\n    |\n  }\n}",
            ["align", "loss", "heads", "resample", "intra", "inter", "random", "samples", "weight"],
        ),
        (
            "distill {\n  mimic student.blocks[0] -> teacher.norm { align = |",
            ["linear", "identity", "mlp"],
        ),
        ("distill {\n  nkd { temperature = 1.0 g|", ["gamma"]),
        ("distill {\n  mimic |", ["student", "teacher"]),
        ("distill {\n  mimic student.blocks[|", []),
        ("distill {\n  mimic student.blocks[0:2].|", list(language.tap_subpoints())),
        ("distill {\n  mimic student.blocks[0].attn -> teacher.blocks[0].a|", ["attn", "attn_map"]),
        ("distill {\n  mimic student.blocks[0] -> teacher.norm a|", ["as"]),
        ("distill {\n  mimic student.blocks[0] -> teacher.norm as |", []),
        ("# a comment |", []),
        ('student x { weights = "a|" }', []),
        ("train {\n  epochs = 3|", []),
    ],
)
def test_completion_contexts(text, expected) -> None:
    assert labels(text) == expected


def test_term_keywords_where_a_term_may_start() -> None:
    assert set(labels("distill {\n  |\n}")) == set(language.term_kinds())
    after_logit = labels("distill {\n  nkd\n  |\n}")
    assert "as" in after_logit and set(language.term_kinds()) <= set(after_logit)
    assert not set(language.tap_sides()) & set(after_logit)  # nkd pairs no taps
    assert labels("distill {\n  nkd |") == after_logit
    paired = labels("distill {\n  mimic student.blocks[0] -> teacher.norm\n  |\n}")
    assert paired == ["as", *language.term_kinds()]
    items, _ = complete("distill {\n  ", 12, HERE)
    assert {i.label: i.detail for i in items} == {
        k: language.term_summary(k) for k in language.term_kinds()
    }
    # an error earlier in the file does not stop completion further down
    assert set(labels("train { x = = }\ndistill {\n  |\n}")) == set(language.term_kinds())


def test_model_names_by_prefix_and_from() -> None:
    got = labels("teacher deit3_s|")
    assert "deit3_small_patch16_224" in got and all(g.startswith("deit3_s") for g in got)
    assert labels("teacher |")[0] == "from"
    items, more = complete("student ", 8, HERE)
    assert more and len(items) == 300  # cut short: the client asks again with a prefix


def test_recipe_paths_after_extends_and_from() -> None:
    assert labels('extends "base/|"') == ["base/deit_imagenet.vkd"]
    assert labels('teacher from "quickstart_t|"') == ["quickstart_teacher.vkd"]


def test_tolerant_scan_and_brackets() -> None:
    tokens = scan('x = "a # b" # c\n{ [ ( ] }')
    assert [t.text for t in tokens] == ["x", "=", '"a # b"', "{", "[", "(", "]", "}"]
    assert open_brackets(scan("a { b ( c [ d ] )")) == [1]


def test_definition_of_paths() -> None:
    text = (RECIPES / "quickstart.vkd").read_text()
    assert [v for _, _, v in path_strings(text)] == [
        "quickstart_baseline.vkd",
        "quickstart_teacher.vkd",
    ]
    at = text.index('"quickstart_teacher.vkd')
    assert definition(text, at, RECIPES / "quickstart.vkd") == RECIPES / "quickstart_teacher.vkd"
    assert definition(text, 0, RECIPES / "quickstart.vkd") is None
