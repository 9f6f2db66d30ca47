"""Stage 1: parsing into typed nodes, positions, and syntax errors in words."""

from __future__ import annotations

import pytest

from vitkdl import syntax as syn
from vitkdl.errors import VkdError

DESIGN = """
recipe deit_base_vitkd_kd
extends "base/deit_imagenet.vkd"
teacher deit3_large_patch16_224.fb_in22k_ft_in1k { weights = "w.safetensors" }
student deit_base_patch16_224 { drop_path = 0.1 }
distill {
    mimic student.blocks[0, 1] -> teacher.blocks[0:2] { align = linear weight = 3e-5 }
    generate student.norm -> teacher.norm as deep { mask = 0.5 generator = conv }
    nkd { temperature = 1.0 gamma = 1 }
}
train { optimizer = adamw(lr = 1e-3, weight_decay = 0.05) compile = max-autotune
        betas = [0.9, 0.999] ema = 0.99996 flag = true }
"""


def test_design_example_parses_to_typed_nodes() -> None:
    tree = syn.parse(DESIGN, "x.vkd")
    keywords = [s.keyword for s in tree.statements]
    assert keywords == ["recipe", "extends", "teacher", "student", "distill", "train"]
    teacher = tree.statements[2]
    assert teacher.arg == "deit3_large_patch16_224.fb_in22k_ft_in1k"
    assert (teacher.arg_span.line, teacher.arg_span.column) == (4, 9)
    mimic, generate, nkd = tree.statements[4].terms
    assert mimic.kind == "mimic" and mimic.students[0].index[0].value == 0
    slice_ = mimic.teachers[0].index[0]
    assert isinstance(slice_, syn.Slice) and (slice_.start, slice_.stop) == (0, 2)
    assert generate.alias == "deep" and generate.students[0].point == "norm"
    assert nkd.kind == "nkd" and isinstance(nkd.fields[1].value, syn.Number)
    assert nkd.fields[1].value.value == 1 and isinstance(nkd.fields[1].value.value, int)
    train = {f.name: f.value for f in tree.statements[5].fields}
    assert isinstance(train["optimizer"], syn.Call)
    assert [k.name for k in train["optimizer"].kwargs] == ["lr", "weight_decay"]
    assert train["compile"].value == "max-autotune"
    assert [v.value for v in train["betas"].items] == [0.9, 0.999]
    assert train["flag"].value is True


def test_keywords_are_contextual() -> None:
    # `mask`, `labels` and `train` stay usable as words where no keyword is expected.
    tree = syn.parse("recipe train\nstudent x { mask = labels }", "k.vkd")
    assert tree.statements[0].arg == "train"
    assert tree.statements[1].fields[0].value.value == "labels"


def test_negative_indices_and_steps() -> None:
    tree = syn.parse("distill { mimic student.blocks[-1, 2:12:3] -> teacher.blocks[::2] }")
    tap = tree.statements[0].terms[0].students[0]
    assert tap.index[0].value == -1
    assert (tap.index[1].start, tap.index[1].stop, tap.index[1].step) == (2, 12, 3)


def _errors(text: str) -> list[str]:
    with pytest.raises(VkdError) as info:
        syn.parse(text, "t.vkd")
    return [d.message for d in info.value.diagnostics]


def test_every_broken_line_is_reported() -> None:
    text = "student x {\n  drop_path 0.1\n}\ntrian { epochs = 1 }\ndistill {\n  mimick a\n}\n"
    with pytest.raises(VkdError) as info:
        syn.parse(text, "t.vkd")
    diags = info.value.diagnostics
    assert [(d.span.line, d.message) for d in diags] == [
        (2, "unexpected '0.1'"),
        (4, "unknown block 'trian'"),
    ]
    assert diags[1].hint == "did you mean 'train'?"


def test_the_grammar_knows_no_term_kind() -> None:
    """A term is any keyword with optional taps, name and body: the registry of kinds, in the
    spec stage, decides (tests/test_spec.py checks the misspelt ones)."""
    tree = syn.parse("distill { generat student.blocks[0:2].attn -> teacher.norm as g { } }")
    (term,) = tree.statements[0].terms
    assert (term.kind, term.alias, term.students[0].sub) == ("generat", "g", "attn")


def test_unclosed_brace_and_single_quotes() -> None:
    assert _errors("student x {") == ["unexpected end of file"]
    assert _errors("student x { weights = 'a' }") == ['unexpected character "\'"']


def test_parse_value_for_overrides() -> None:
    assert syn.parse_value("1e-3").value == 1e-3
    call = syn.parse_value("adamw(lr = 1e-3)", column=20)
    assert call.name == "adamw" and call.span.column == 20
    with pytest.raises(VkdError):
        syn.parse_value("adamw(")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"\x00\x01binary", "binary file"),
        (b"student \xff\xfe x", "not UTF-8"),
        ("student x".encode("utf-16"), "UTF-16"),
    ],
)
def test_unreadable_sources_are_one_line_errors(tmp_path, content: bytes, message: str) -> None:
    path = tmp_path / "r.vkd"
    path.write_bytes(content)
    with pytest.raises(VkdError) as info:
        syn.read_source(path)
    (diag,) = info.value.diagnostics
    assert message in diag.message


def test_missing_directory_and_huge_sources(tmp_path) -> None:
    for target, message in ((tmp_path / "nope.vkd", "no such file"), (tmp_path, "directory")):
        with pytest.raises(VkdError, match=message):
            syn.read_source(target)
    big = tmp_path / "big.vkd"
    big.write_text("# x\n" * 3_000_000)
    with pytest.raises(VkdError, match="MB"):
        syn.read_source(big)


def test_strings_keep_backslashes_that_are_not_escapes() -> None:
    source = r'data imagefolder { root = "C:\data\set \"x\" é\n" }'
    (field,) = syn.parse(source, "t.vkd").statements[0].fields
    assert field.value.value == 'C:\\data\\set "x" é\n'  # \d and \s stay; é is é
