"""``vitkdl lsp`` spoken to over stdio by a protocol client, as an editor does."""

from __future__ import annotations

import sys
import time

import pytest

import vitkdl
from tests.conftest import GOLDEN, RECIPES, ROOT
from tests.lsp.client import Client
from vitkdl.cli import main
from vitkdl.fmt import format_text

pytest.importorskip("pygls.lsp.server")

TINY = RECIPES / "deit_tiny_vitkd_kd.vkd"


@pytest.fixture(scope="module")
def client():
    c = Client(ROOT, env={"VITKDL_LSP_DEBOUNCE": "0.05"})
    result = c.initialize(ROOT)
    c.startup_s = time.perf_counter() - c.started
    c.capabilities = result["capabilities"]
    yield c
    assert c.close() == 0


def _find(text: str, needle: str, nth: int = 0) -> tuple[int, int]:
    """0-based (line, character) of the nth occurrence of ``needle``."""
    at = -1
    for _ in range(nth + 1):
        at = text.index(needle, at + 1)
    head = text[:at]
    return head.count("\n"), at - (head.rfind("\n") + 1)


def test_server_starts_and_announces_its_features(client) -> None:
    caps = client.capabilities
    assert caps["hoverProvider"] and caps["definitionProvider"]
    assert caps["documentFormattingProvider"]
    assert "." in caps["completionProvider"]["triggerCharacters"]
    assert client.startup_s < 30
    print(f"\nLSP initialize round trip after process start: {client.startup_s:.2f} s")


def test_broken_recipe_gets_every_diagnostic_at_its_exact_range(client, tmp_path) -> None:
    source = GOLDEN / "broken" / "many_errors.vkd"
    text = source.read_text()
    path = tmp_path / "many_errors.vkd"
    uri = client.open(path, text)
    got = client.diagnostics(uri, version=1)
    _, expected, _ = vitkdl.validate(path, text=text)
    assert len(got) == len(expected) >= 7
    want = {
        (
            (d.span.line - 1, d.span.column - 1),
            (d.span.end_line - 1, d.span.end_column - 1),
            1 if d.is_error else 2,
            d.message,
        )
        for d in expected
    }
    have = {
        (
            (g["range"]["start"]["line"], g["range"]["start"]["character"]),
            (g["range"]["end"]["line"], g["range"]["end"]["character"]),
            g["severity"],
            g["message"].split("\n")[0],
        )
        for g in got
    }
    assert have == want
    unknown = next(g for g in got if "unknown timm model" in g["message"])
    assert unknown["range"] == {
        "start": {"line": 1, "character": 8},
        "end": {"line": 1, "character": 30},
    }
    assert "help: did you mean 'deit3_small_patch16_224'" in unknown["message"]


def test_diagnostics_follow_unsaved_edits(client, tmp_path) -> None:
    text = TINY.read_text()
    path = RECIPES / "edited.vkd"  # never written: its extends resolves beside the shipped ones
    uri = client.open(path, text)
    first = client.diagnostics(uri, version=1)
    assert not [d for d in first if d["severity"] == 1]
    broken = text.replace("mask = 0.5", "mask = 2")
    for version, t in enumerate([broken[:-3], broken[:-2], broken], start=2):
        client.change(uri, t, version)  # typed quickly: only the last is checked
    start = time.perf_counter()
    errors = [d for d in client.diagnostics(uri, version=4) if d["severity"] == 1]
    latency = time.perf_counter() - start
    line, character = _find(broken, "mask = 2")
    assert [(e["range"]["start"], e["message"].split("\n")[0]) for e in errors] == [
        ({"line": line, "character": character}, "mask must lie in (0, 1), got 2.0")
    ]
    client.change(uri, text, 5)
    assert not [d for d in client.diagnostics(uri, version=5) if d["severity"] == 1]
    print(f"\nwarm diagnostics after an edit: {latency * 1000:.0f} ms (debounce 50 ms)")
    assert latency < 5


def test_a_problem_in_the_base_recipe_is_shown_on_the_extends_path(client, tmp_path) -> None:
    (tmp_path / "base.vkd").write_text("train {\n    epochs = 0\n}\n")
    text = 'extends "base.vkd"\nstudent deit_tiny_patch16_224\n'
    uri = client.open(tmp_path / "user.vkd", text)
    (diag,) = [d for d in client.diagnostics(uri, version=1) if d["severity"] == 1]
    assert diag["range"]["start"] == {"line": 0, "character": 8}
    assert "base.vkd:2:5: epochs must be > 0, got 0" in diag["message"]
    related = diag["relatedInformation"][0]["location"]
    assert related["uri"] == (tmp_path / "base.vkd").resolve().as_uri()


def test_hover_on_a_model_describes_its_shape(client) -> None:
    text = TINY.read_text()
    uri = client.open(TINY, text)
    client.diagnostics(uri, version=1)
    line, character = _find(text, "student deit_tiny_patch")
    student = client.request("textDocument/hover", client.at(uri, line, character + 8))
    value = student["contents"]["value"]
    assert "**deit_tiny_patch16_224**" in value and "the student" in value
    assert "192 x 12 blocks, 3 heads" in value and "196 on a 14x14 grid" in value
    assert "5.7M" in value
    teacher = client.request("textDocument/hover", client.at(uri, *_find(text, "deit3_small")))
    assert "384 x 12 blocks, 6 heads" in teacher["contents"]["value"]


def test_hover_on_taps_terms_and_fields(client) -> None:
    text = TINY.read_text()
    uri = client.open(TINY, text, version=1)
    tap = client.request("textDocument/hover", client.at(uri, *_find(text, "blocks[0, 1]")))
    assert "blocks 0, 1 of the student's 12" in tap["contents"]["value"]
    assert "196 x 192" in tap["contents"]["value"]
    term = client.request("textDocument/hover", client.at(uri, *_find(text, "mimic")))
    value = term["contents"]["value"]
    assert "3e-05 * sum((align(s) - t)^2) / B" in value
    assert "per-element coefficient 4.516" in value and "Linear(192, 384)" in value
    field = client.request("textDocument/hover", client.at(uri, *_find(text, "align")))
    assert "one of linear, identity, mlp" in field["contents"]["value"]
    nothing = client.request("textDocument/hover", client.at(uri, 0, 3))  # a comment
    assert nothing is None


def test_hover_on_taps_inside_the_blocks(client) -> None:
    from vitkdl.terms import KINDS

    path = RECIPES / "ablations" / "shallow_attn_map.vkd"
    text = path.read_text()
    uri = client.open(path, text, version=1)
    tap = client.request("textDocument/hover", client.at(uri, *_find(text, "student.blocks")))
    value = tap["contents"]["value"]
    assert "**student.blocks[0, 1].attn_map**: blocks 0.attn_map, 1.attn_map" in value
    assert "3 x 196 x 196 (heads x queries x keys)" in value
    line, _ = _find(text, "-> teacher")
    term = client.request("textDocument/hover", client.at(uri, line, 4))
    keyword = text.split("\n")[line].split()[0]
    assert KINDS[keyword].summary in term["contents"]["value"]


def _labels(result) -> list[str]:
    return [i["label"] for i in result["items"]]


def test_completion_inside_a_term_body_offers_its_fields_and_choices(client, tmp_path) -> None:
    text = (
        "student deit_tiny_patch16_224\nteacher deit3_small_patch16_224\n"
        "distill {\n    mimic student.blocks[0] -> teacher.blocks[0] {\n        \n"
        "        align = \n    }\n    generate student.\n}\n"
    )
    uri = client.open(tmp_path / "typing.vkd", text)
    body = client.request("textDocument/completion", client.at(uri, 4, 8))
    assert _labels(body) == [
        "align",
        "loss",
        "heads",
        "resample",
        "intra",
        "inter",
        "random",
        "samples",
        "weight",
    ]
    assert body["items"][0]["kind"] == 5  # Field
    choices = client.request("textDocument/completion", client.at(uri, 5, 16))
    assert _labels(choices) == ["linear", "identity", "mlp"]
    taps = client.request("textDocument/completion", client.at(uri, 7, 21))
    assert _labels(taps) == ["blocks", "norm", "fc_norm", "pre_logits"]
    terms = client.request("textDocument/completion", client.at(uri, 7, 4))
    assert {"mimic", "generate", "nkd", "kd", "labels"} <= set(_labels(terms))
    top = client.request("textDocument/completion", client.at(uri, 9, 0))
    assert set(_labels(top)) >= {"train", "data", "recipe", "extends"}


def test_completion_of_timm_model_names_by_prefix(client, tmp_path) -> None:
    text = "student deit_ti\n"
    uri = client.open(tmp_path / "models.vkd", text)
    result = client.request("textDocument/completion", client.at(uri, 0, 15))
    assert "deit_tiny_patch16_224" in _labels(result)
    assert all(label.startswith("deit_ti") for label in _labels(result))


def test_go_to_definition_of_extends_and_teacher_from(client) -> None:
    text = TINY.read_text()
    uri = client.open(TINY, text)
    location = client.request(
        "textDocument/definition", client.at(uri, *_find(text, "base/deit_imagenet"))
    )
    assert location["uri"] == (RECIPES / "base" / "deit_imagenet.vkd").resolve().as_uri()
    quick = (RECIPES / "quickstart.vkd").read_text()
    uri = client.open(RECIPES / "quickstart.vkd", quick)
    location = client.request(
        "textDocument/definition", client.at(uri, *_find(quick, 'quickstart_teacher.vkd"'))
    )
    assert location["uri"] == (RECIPES / "quickstart_teacher.vkd").resolve().as_uri()


def test_formatting_is_vitkdl_fmt(client, tmp_path) -> None:
    text = "student   deit_tiny_patch16_224{drop_path=0.1 # why\n}\n"
    uri = client.open(tmp_path / "messy.vkd", text)
    (edit,) = client.request(
        "textDocument/formatting",
        {"textDocument": {"uri": uri}, "options": {"tabSize": 4, "insertSpaces": True}},
    )
    assert edit["newText"] == format_text(text)
    assert edit["range"]["start"] == {"line": 0, "character": 0}
    assert edit["range"]["end"] == {"line": 2, "character": 0}


def test_without_pygls_the_command_says_how_to_install_it(monkeypatch, capsys) -> None:
    for name in [
        m for m in sys.modules if m == "pygls" or m.startswith(("pygls.", "vitkdl.lsp.server"))
    ]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "pygls", None)
    assert main(["lsp"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install -e ".[lsp]"' in err
    assert "Traceback" not in err


def test_hover_on_a_norm_that_is_an_identity_and_on_fc_norm(client, tmp_path) -> None:
    model = (
        "img_size = 16  patch_size = 4  depth = 1  embed_dim = 16  num_heads = 2  "
        'global_pool = "avg"'
    )
    text = (
        f"student vit_tiny_patch16_224 {{ {model} }}\n"
        f"teacher vit_small_patch16_224 {{ {model}  head = random }}\n"
        "distill {\n    mimic student.fc_norm -> teacher.norm\n}\n"
    )
    uri = client.open(tmp_path / "pooled.vkd", text, version=1)
    client.diagnostics(uri, version=1)
    norm = client.request("textDocument/hover", client.at(uri, *_find(text, "teacher.norm")))
    assert "the last block's output of the teacher" in norm["contents"]["value"]
    assert "identity on this model" in norm["contents"]["value"]
    pooled = client.request("textDocument/hover", client.at(uri, *_find(text, "student.fc_norm")))
    assert "the pooled, normalised feature of the student" in pooled["contents"]["value"]
    assert "1 x 16 (one pooled token x channels)" in pooled["contents"]["value"]


def test_hover_on_pre_logits(client, tmp_path) -> None:
    model = "img_size = 16  patch_size = 4  depth = 1  embed_dim = %d  num_heads = 2"
    text = (
        f"student vit_tiny_patch16_224 {{ {model % 16} }}\n"
        f"teacher vit_small_patch16_224 {{ {model % 32}  head = random }}\n"
        "distill {\n    srrl student.pre_logits -> teacher.pre_logits\n}\n"
    )
    uri = client.open(tmp_path / "head.vkd", text, version=1)
    client.diagnostics(uri, version=1)
    hover = client.request("textDocument/hover", client.at(uri, *_find(text, "teacher.pre_logits")))
    value = hover["contents"]["value"]
    assert "the pooled feature the classifier head of the teacher" in value
    assert "32 (channels)" in value


def test_a_file_that_is_not_a_recipe_is_not_echoed_to_the_editor(tmp_path) -> None:
    """`extends` of a readable non-recipe file: one diagnostic on the path string, and none of
    the file's lines in any message or related location (before, each line was an error)."""
    from vitkdl.lsp.analysis import analyse
    from vitkdl.lsp.server import to_protocol

    (tmp_path / "secrets.env").write_text("".join(f"token_{i}: hunter{i}\n" for i in range(9)))
    text = 'extends "secrets.env"\nstudent deit_tiny_patch16_224\n'
    out = to_protocol(analyse(text, tmp_path / "user.vkd"), "utf-16")
    errors = [d for d in out if d.severity == 1]
    assert len(errors) == 1
    assert errors[0].range.start.line == 0 and errors[0].range.start.character == 8
    assert "not a .vkd recipe" in errors[0].message
    assert not any("hunter" in d.message or d.related_information for d in out)
