"""The vocabulary tools use: read off the grammar and the spec models, never listed twice."""

from __future__ import annotations

from vitkdl import language, spec
from vitkdl.terms import KINDS


def test_terms_come_from_the_registry() -> None:
    assert language.term_kinds() == tuple(KINDS)
    assert language.term_models() == {k: kind.spec for k, kind in KINDS.items()}
    assert language.feature_kinds() == tuple(k for k, kind in KINDS.items() if kind.paired)
    for kind in language.feature_kinds():
        assert "student" in language.term_models()[kind].model_fields
    for keyword, kind in KINDS.items():
        assert language.term_summary(keyword) == kind.summary
    assert set(language.term_kinds()) <= set(language.keywords())


def test_statements_and_the_terms_block_come_from_the_grammar() -> None:
    assert set(language.statement_keywords()) >= set(language.block_models())
    block = language.terms_block()
    assert block is not None
    words = language.expected_words(f"{block} {{")
    assert words is not None and set(language.term_kinds()) <= set(words)
    assert language.expected_terminals("student {") is None  # a syntax error
    assert language.expected_words("student {") is None


def test_where_a_term_may_start_is_asked_of_the_grammar() -> None:
    block = language.terms_block()
    keyword, paired = language.term_kinds()[0], language.feature_kinds()[0]
    assert language.term_may_start(f"{block} {{")
    assert language.term_may_start(f"{block} {{ {keyword}")  # the next term
    assert language.term_may_start(f"{block} {{ {paired} student.blocks[0] -> teacher.norm")
    assert not language.term_may_start(f"{block} {{ {keyword} as")  # an alias
    assert not language.term_may_start(f"{block} {{ {keyword} {{")  # a field
    assert not language.term_may_start("")  # a statement
    assert not language.term_may_start("teacher")  # a model name
    for text in ("", "teacher", "train {"):
        assert not set(language.term_kinds()) & set(language.expected_words(text) or ())


def test_block_fields_are_the_spec_lists() -> None:
    models = language.block_models()
    assert models["student"] is spec.ModelSpec and models["data"] is spec.DataSpec
    assert language.fields_of(models["student"], "student") == spec.MODEL_FIELDS
    assert language.fields_of(models["train"], "train") == spec.BLOCK_FIELDS["train"]
    assert language.block_argument("data") == "source"
    assert language.takes_model_name("teacher") and not language.takes_model_name("data")


def test_term_fields_leave_out_what_the_syntax_sets() -> None:
    for model in language.term_models().values():
        fields = language.fields_of(model)
        assert fields[-1] == "weight"  # a kind's own fields first, then every term's
        assert not {"kind", "name", "student", "teacher", "span", "spans"} & set(fields)


def test_choices_types_and_defaults() -> None:
    train = language.block_models()["train"]
    assert language.value_choices(train, "precision") == ("auto", "bf16", "fp16", "fp32")
    assert "adamw" in language.value_choices(train, "optimizer")
    assert language.value_choices(spec.ModelSpec, "pretrained") == ("false", "true")
    assert language.describe_type(spec.ModelSpec, "drop_path") == "a number >= 0 and < 1"
    assert language.describe_type(spec.DataSpec, "batch_size") == "a whole number > 0"
    assert language.field_default(spec.DataSpec, "batch_size") == "64"
    assert [language.format_number(x) for x in (3e-5, 1e9, 0.5, 300)] == [
        "3e-5",
        "1e9",
        "0.5",
        "300",
    ]
    assert language.tap_points() == ("blocks", "norm", "fc_norm", "pre_logits")
    assert language.tap_subpoints() == spec.TAP_SUBPOINTS
