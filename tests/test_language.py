"""The vocabulary tools use: read off the grammar and the spec models, never listed twice."""

from __future__ import annotations

from vitkdl import language, spec


def test_terms_come_from_the_registry() -> None:
    assert language.term_kinds() == tuple(spec.TERM_MODELS)
    for kind in language.feature_kinds():
        assert "student" in language.term_models()[kind].model_fields


def test_statements_and_the_terms_block_come_from_the_grammar() -> None:
    assert set(language.statement_keywords()) >= set(language.block_models())
    block = language.terms_block()
    accepts = language.expected_terminals(f"{block} {{")
    assert accepts is not None
    words = {w for t in accepts for w in language.terminal_words(t)}
    assert set(language.term_kinds()) <= words
    assert language.expected_terminals("student {") is None  # a syntax error


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
        assert "weight" in fields
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
    assert language.tap_points() == ("blocks", "norm")
