"""The formatter: one canonical layout, every comment kept, meaning (the recipe hash) kept."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import RECIPES
from vitkdl import language
from vitkdl.errors import VkdError
from vitkdl.fmt import format_text
from vitkdl.spec import load_spec
from vitkdl.syntax import concrete_parser

ALL_SHIPPED = sorted(RECIPES.rglob("*.vkd"))

UNTIDY = """

# header comment
#   indented header
recipe   demo   # the name
extends "base/deit_imagenet.vkd"
teacher deit3_small_patch16_224.fb_in22k_ft_in1k { weights="x.safetensors" }
student deit_tiny_patch16_224{}
distill{
  # shallow
  mimic student.blocks[ 0,1 ] ->teacher.blocks[0 , 1]{align=linear weight = 3e-5}


  generate student . norm -> teacher.norm as gen # deep
  { mask = 0.5   generator = conv
      # before weight
      weight = 3e-6
  }
  nkd { temperature=1.0 gamma = 1.0 } kd
  labels {
     # nothing here
  }
}
train { optimizer = adamw(lr = 1e-3, # the paper's lr
   weight_decay = 0.05,)
  schedule = cosine(warmup_epochs = 20, )   epochs = 300
}
# trailing file comment


"""

CANONICAL = """\
# header comment
#   indented header
recipe demo  # the name
extends "base/deit_imagenet.vkd"

teacher deit3_small_patch16_224.fb_in22k_ft_in1k {
    weights = "x.safetensors"
}

student deit_tiny_patch16_224 {}

distill {
    # shallow
    mimic student.blocks[0, 1] -> teacher.blocks[0, 1] {
        align = linear
        weight = 3e-5
    }

    generate student.norm -> teacher.norm as gen {  # deep
        mask = 0.5
        generator = conv
        # before weight
        weight = 3e-6
    }
    nkd {
        temperature = 1.0
        gamma = 1.0
    }
    kd
    labels {
        # nothing here
    }
}

train {
    optimizer = adamw(lr = 1e-3,  # the paper's lr
        weight_decay = 0.05)
    schedule = cosine(warmup_epochs = 20)
    epochs = 300
}

# trailing file comment
"""


def _comments(text: str) -> list[str]:
    """Every comment, in order: a '#' outside a string, to the end of its line."""
    out, in_string, i = [], False, 0
    while i < len(text):
        c = text[i]
        if in_string:
            i += 2 if c == "\\" else 1
            in_string = in_string and c != '"'
            continue
        if c == '"':
            in_string = True
        elif c == "#":
            end = text.find("\n", i)
            end = len(text) if end < 0 else end
            out.append(text[i:end].rstrip())
            i = end
            continue
        i += 1
    return out


def _hash(text: str, path=RECIPES / "untidy.vkd") -> tuple[str | None, list[str]]:
    spec, diags, _ = load_spec(path, text=text)
    return (spec.hash() if spec else None), [d.message for d in diags]


def test_untidy_recipe_becomes_canonical_with_every_comment_and_the_same_hash() -> None:
    out = format_text(UNTIDY)
    assert out == CANONICAL
    assert _comments(out) == _comments(UNTIDY)
    assert _hash(out) == _hash(UNTIDY) and _hash(out)[0] is not None
    assert format_text(out) == out


@pytest.mark.parametrize("path", ALL_SHIPPED, ids=lambda p: str(p.relative_to(RECIPES)))
def test_shipped_recipes_are_canonical_and_keep_their_hash(path) -> None:
    text = path.read_text()
    out = format_text(text, str(path))
    assert out == text, "run: vitkdl fmt recipes"
    assert _hash(out, path) == _hash(text, path)


def _untidy(text: str, rng: random.Random) -> str:
    """The same tokens and comments with whitespace scrambled: spaces inside lines, indents,
    extra blank lines, trailing spaces."""
    tree = concrete_parser().parse(text, start="start")
    tokens = [t for t in tree.scan_values(lambda v: v is not None)]
    out, pos = [], 0
    for tok in tokens:
        gap = text[pos : tok.start_pos]
        if "\n" not in gap:
            gap = (
                " " * rng.choice([0, 1, 3])
                if pos and not (text[pos - 1].isalnum() and str(tok)[0].isalnum())
                else " " * rng.choice([1, 2])
            )
        else:
            lines = gap.split("\n")
            lines = [lines[0] + " " * rng.choice([0, 2])] + [
                " " * rng.choice([0, 1, 6]) + line.strip() for line in lines[1:]
            ]
            if rng.random() < 0.5:  # add blank lines where fmt collapses or removes them
                if "" in lines[1:-1]:
                    lines.insert(lines.index("", 1), "")
                elif str(tok) == "}":
                    lines.insert(len(lines) - 1, "")
                elif text[pos - 1 : pos] == "{":
                    lines.insert(1, "")
            gap = "\n".join(lines)
        out.append(gap + str(tok))
        pos = tok.end_pos
    return "".join(out) + text[pos:] + "\n" * rng.choice([0, 2])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), index=st.integers(0, len(ALL_SHIPPED) - 1))
def test_scrambled_shipped_recipes_format_back_to_themselves(seed, index) -> None:
    path = ALL_SHIPPED[index]
    text = path.read_text()
    messy = _untidy(text, random.Random(seed))
    assert format_text(messy) == text


# --------------------------------------------------------------------------------------------
# Generated recipes: any parseable recipe keeps its meaning and formats idempotently

NAMES = st.sampled_from(["x", "lr", "weight", "a_b", "deit_tiny_patch16_224", "linear", "m-1"])
SEPARATORS = st.sampled_from([" ", "  ", "\n", "\n\n", "\t", " # c\n", "\n  # own\n", "\n\n# b\n"])


def _values(depth: int = 0) -> st.SearchStrategy[list[str]]:
    scalar = st.one_of(
        st.sampled_from(
            ["1", "-2", "3e-5", "0.5", "1.", ".5", "true", "false", '"s p"', '"a\\"b"']
        ).map(lambda v: [v]),
        NAMES.map(lambda v: [v]),
    )
    if depth >= 2:
        return scalar

    def call(args: list[list[str]]) -> list[str]:
        out = ["adamw", "("]
        for i, a in enumerate(args):
            out += [*([","] if i else []), f"k{i}", "=", *a]
        return [*out, *([","] if args and len(args) % 2 else []), ")"]

    def lst(items: list[list[str]]) -> list[str]:
        out = ["["]
        for i, a in enumerate(items):
            out += [*([","] if i else []), *a]
        return [*out, *([","] if len(items) == 1 else []), "]"]

    return st.one_of(
        scalar,
        st.lists(_values(depth + 1), max_size=3).map(call),
        st.lists(_values(depth + 1), max_size=3).map(lst),
    )


def _body() -> st.SearchStrategy[list[str]]:
    field = st.tuples(NAMES, _values()).map(lambda f: [f[0], "=", *f[1]])
    return st.lists(field, max_size=3).map(lambda fs: ["{", *[t for f in fs for t in f], "}"])


def _optional_body() -> st.SearchStrategy[list[str]]:
    return st.one_of(st.just([]), _body())


def _tap(side: str) -> st.SearchStrategy[list[str]]:
    index = st.sampled_from(
        [["0"], ["0", ",", "1"], ["-1"], [":", "2"], ["2", ":", "12", ":", "3"], ["::", "2"]]
    )
    blocks = index.map(lambda i: [side, ".", "blocks", "[", *i, "]"])
    return st.one_of(st.just([side, ".", "norm"]), blocks)


@st.composite
def _term(draw: st.DrawFn) -> list[str]:
    kind = draw(st.sampled_from(language.term_kinds()))
    out = [kind]
    if kind in language.feature_kinds():
        out += [*draw(_tap("student")), "->", *draw(_tap("teacher"))]
    if draw(st.booleans()):
        out += ["as", draw(NAMES)]
    return out + draw(_optional_body())


@st.composite
def generated_recipe(draw: st.DrawFn) -> str:
    statements = [
        st.just(["recipe", "demo"]),
        st.just(["student", "deit_tiny_patch16_224"])
        .map(lambda s: s)
        .flatmap(lambda s: _optional_body().map(lambda b: s + b)),
        _optional_body().map(lambda b: ["teacher", "deit3_small_patch16_224", ".", "fb", *b]),
        _optional_body().map(lambda b: ["data", "synthetic", *b]),
        st.lists(_term(), max_size=4).map(
            lambda ts: ["distill", "{", *[t for x in ts for t in x], "}"]
        ),
        _body().map(lambda b: ["train", *b]),
    ]
    chosen = draw(st.lists(st.sampled_from(range(len(statements))), max_size=6, unique=True))
    tokens = [t for i in chosen for t in draw(statements[i])]
    text = draw(SEPARATORS).lstrip(" \t")
    for tok in tokens:
        text += tok + draw(SEPARATORS)
    return text


@pytest.mark.slow
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=generated_recipe())
def test_generated_recipes_keep_their_meaning_and_format_idempotently(text) -> None:
    out = format_text(text)
    assert format_text(out) == out
    assert _comments(out) == _comments(text)
    assert _hash(out) == _hash(text)


def test_syntax_errors_are_reported_not_formatted() -> None:
    with pytest.raises(VkdError) as info:
        format_text("student x {\n  a = \n}\n", "bad.vkd")
    assert info.value.diagnostics[0].span.line == 3
    assert str(info.value).startswith("bad.vkd:3:1: error: unexpected '}'")


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("", ""),
        ("# only a comment", "# only a comment\n"),
        ("student x{}\r\n", "student x {}\n"),
        ("\ufeffstudent x", "student x\n"),
        ("train{a=[[1,2,],[]] b=f()}", "train {\n    a = [[1, 2], []]\n    b = f()\n}\n"),
        (
            "distill{mimic student.blocks[::2]->teacher.blocks[1:]{}}",
            "distill {\n    mimic student.blocks[::2] -> teacher.blocks[1:] {}\n}\n",
        ),
        ('recipe a\n\n\n\nextends "b.vkd"', 'recipe a\n\nextends "b.vkd"\n'),
        (
            'recipe a extends "b.vkd" student x{y=1}',
            'recipe a\nextends "b.vkd"\n\nstudent x {\n    y = 1\n}\n',
        ),
        ("student x {   # why\n}", "student x {  # why\n}\n"),
        (
            "student x { a = 1 # one\n b = 2 }  # end",
            "student x {\n    a = 1  # one\n    b = 2\n}  # end\n",
        ),
    ],
)
def test_layout_rules(text, canonical) -> None:
    assert format_text(text) == canonical
    assert format_text(canonical) == canonical


EXTENDED = """
# sub-block taps, a term kind not registered yet (the grammar knows no kind), and a sweep
student deit_tiny_distilled_patch16_224
distill{ mimic student.blocks[0:2].attn->teacher.blocks[0:2] . attn {weight=3e-5}
  token{mode=hard weight = 0.5} # distillation token
}
sweep {distill.generate.mask=[0.25,0.5,0.75,]   seeds=[0,1,2]}
"""

EXTENDED_CANONICAL = """\
# sub-block taps, a term kind not registered yet (the grammar knows no kind), and a sweep
student deit_tiny_distilled_patch16_224

distill {
    mimic student.blocks[0:2].attn -> teacher.blocks[0:2].attn {
        weight = 3e-5
    }
    token {
        mode = hard
        weight = 0.5
    }  # distillation token
}

sweep {
    distill.generate.mask = [0.25, 0.5, 0.75]
    seeds = [0, 1, 2]
}
"""


def test_sub_block_taps_new_term_kinds_and_sweeps_format_with_the_grammar() -> None:
    assert format_text(EXTENDED) == EXTENDED_CANONICAL
    assert format_text(EXTENDED_CANONICAL) == EXTENDED_CANONICAL


def test_grammar_extensions_need_no_formatter_change(monkeypatch) -> None:
    from lark import Lark

    from vitkdl import syntax

    grammar = syntax.concrete_parser().source_grammar
    for old, new in [
        ("          | sweep\n", "          | sweep\n          | compare\n"),
        (
            "train: _TRAIN body\n",
            'train: _TRAIN body\ncompare: _COMPARE "{" compare_item* "}"\n'
            'compare_item: NAME ("." NAME)* "=" value\n_COMPARE.2: /compare(?![\\w-])/\n',
        ),
    ]:
        assert old in grammar
        grammar = grammar.replace(old, new)
    parser = Lark(
        grammar,
        parser="lalr",
        start=["start", "value_only"],
        propagate_positions=True,
        maybe_placeholders=True,
        keep_all_tokens=True,
    )
    monkeypatch.setattr(syntax, "concrete_parser", lambda: parser)
    monkeypatch.setattr(syntax, "parse", lambda text, file: None)  # the old typed tree
    text = EXTENDED + "compare {a.b=[1,2,] c = x}"
    canonical = EXTENDED_CANONICAL + "\ncompare {\n    a.b = [1, 2]\n    c = x\n}\n"
    assert format_text(text) == canonical
    assert format_text(canonical) == canonical
