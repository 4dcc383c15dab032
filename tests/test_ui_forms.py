"""The UI's forms are made from settings dataclasses and bound by name, and the UI's source names no method:
every method-specific part of a page comes from the registry (no server is started here)."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from studio.utils.settings import setting

UI = Path(__file__).resolve().parents[1] / "studio" / "ui"


@dataclass
class Knobs:
    rank: int = setting(4, help="how many directions the adapter learns")
    scale: float | None = setting(None, help="the output's multiplier; empty: rank")
    dropout: bool = setting(False, help="drop a tenth of the inputs while training")
    rotate: str = setting("input", help="which bases rotate", choices=("input", "both"))
    target_modules: list[str] = setting(default_factory=lambda: ["attn1", "attn2"], help="modules to adapt")
    channels: list[int] = setting(default_factory=lambda: [16, 32], help="the widths", advanced=True)
    label: str = "plain"
    extra: dict = field(default_factory=dict)


def _form(**kwargs):
    import gradio as gr

    from studio.ui.forms import settings_form

    with gr.Blocks():
        return settings_form(Knobs, **kwargs)


def test_a_form_is_made_from_the_dataclass_fields():
    import gradio as gr

    form = _form()
    assert list(form) == ["rank", "scale", "dropout", "rotate", "target_modules", "label", "extra", "channels"]
    kinds = {name: type(component) for name, component in form.items()}
    assert kinds == {"rank": gr.Number, "scale": gr.Number, "dropout": gr.Checkbox, "rotate": gr.Dropdown,
                     "target_modules": gr.Textbox, "label": gr.Textbox, "extra": gr.Textbox, "channels": gr.Textbox}
    rank = form["rank"]
    assert rank.label == "rank" and rank.value == 4 and rank.precision == 0
    assert "how many directions the adapter learns" in rank.info and "default 4" in rank.info
    assert form["scale"].value is None and "empty: rank" in form["scale"].info
    assert form["dropout"].value is False
    assert form["rotate"].value == "input" and [c[1] for c in form["rotate"].choices] == ["input", "both"]
    assert form["target_modules"].value == "attn1\nattn2" and "one a line" in form["target_modules"].info
    assert form["label"].info == "default plain"  # no help written: the default alone


def test_values_go_back_to_the_dataclass_by_name():
    from studio.loading import StudioError
    from studio.ui.forms import settings_kwargs

    shown = {"rank": 4, "scale": None, "dropout": False, "rotate": "input", "target_modules": "attn1\nattn2",
             "label": "plain", "extra": "", "channels": "16\n32"}
    assert settings_kwargs(Knobs, shown, changed_only=True) == {}
    changed = {**shown, "rank": 12.0, "dropout": True, "target_modules": "to_q\n to_k \n", "channels": "8, 24",
               "extra": '{"a": 1}', "scale": 0.5}
    knobs = Knobs(**settings_kwargs(Knobs, changed))
    assert (knobs.rank, knobs.scale, knobs.dropout, knobs.rotate) == (12, 0.5, True, "input")
    assert knobs.target_modules == ["to_q", "to_k"] and knobs.channels == [8, 24] and knobs.extra == {"a": 1}
    assert settings_kwargs(Knobs, changed, changed_only=True) == {
        "rank": 12, "scale": 0.5, "dropout": True, "target_modules": ["to_q", "to_k"], "channels": [8, 24],
        "extra": {"a": 1}}
    # a prefix keeps two forms apart; an `unset` field starts empty and is sent only when filled in
    assert settings_kwargs(Knobs, {"m__rank": 4, "m__label": "x"}, prefix="m__", unset={"rank": "the preset's"}) \
        == {"rank": 4, "label": "x"}
    assert settings_kwargs(Knobs, {"m__rank": None}, prefix="m__", unset={"rank": "the preset's"}) == {}
    for bad, message in (({"rank": 2.5}, "rank takes a whole number"), ({"rank": None}, "rank needs a value"),
                         ({"channels": "8, wide"}, "channels takes int values"),
                         ({"extra": "[1]"}, "extra takes a JSON mapping")):
        with pytest.raises(StudioError, match=message):
            settings_kwargs(Knobs, bad)


def test_a_handler_bound_by_name_gets_one_dict():
    import inspect

    from studio.ui.forms import bind

    form = _form()
    call = bind(lambda values: sorted(values.items()), form)
    assert list(inspect.signature(call).parameters) == list(form)  # the API endpoint's keywords
    assert call(rank=3, label="x") == [("label", "x"), ("rank", 3)]


def test_every_registered_method_has_its_form_from_its_config_class():
    import gradio as gr

    from studio.adapters import get_method, method_names
    from studio.ui.forms import method_forms
    from studio.utils.settings import describe

    for kind in ("concept", "control"):
        with gr.Blocks():
            forms = method_forms(kind, method_names(kind)[0], skip=("condition",))
        assert list(forms.forms) == method_names(kind)
        for name, form in forms.forms.items():
            fields = [s.name for s in describe(get_method(name).config_class) if s.name != "condition"]
            assert sorted(form) == sorted(f"{name}__{f}" for f in fields)
        assert [g.visible for g in forms.groups.values()] == [True] + [False] * (len(forms.groups) - 1)
        # a field a preset sets starts empty (the preset's), and is sent only when changed
        for name, form in forms.forms.items():
            for field_name in {f for p in get_method(name).presets.values() for f in p.get("adapter", {})}:
                assert form[f"{name}__{field_name}"].value in (None, "")


def _ui_sources() -> list[Path]:
    return sorted(UI.rglob("*.py"))


def test_no_ui_source_names_a_registered_method():
    """The must-show: a grep finds no method name in studio/ui/ (strings, identifiers, comments)."""
    from studio.adapters import method_names

    names = method_names()
    assert len(names) >= 8 and _ui_sources()
    pattern = re.compile(r"(?<![a-z0-9])(" + "|".join(map(re.escape, names)) + r")(?![a-z0-9])", re.IGNORECASE)
    found = []
    for path in _ui_sources():
        text = path.read_text(encoding="utf-8")
        found += [f"{path.relative_to(UI.parent)}:{text[:m.start()].count(chr(10)) + 1}: {m.group(0)}"
                  for m in pattern.finditer(text)]
        for node in ast.walk(ast.parse(text)):  # and, read as code: no literal equals a method's name
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.lower() in names:
                found.append(f"{path.relative_to(UI.parent)}:{node.lineno}: literal {node.value!r}")
    assert not found, found
    assert pattern.search("from studio.adapters.sara import x") and not pattern.search("a soft explorer")
