"""Forms generated from settings dataclasses, and handlers bound to them by name.

`settings_form(cls)` makes one Gradio component per field that `studio.utils.settings.describe(cls)` lists (a
Checkbox for a bool, a Number for an int or float, a Dropdown for a field with choices, a Textbox for text, a list
(one item a line) or a mapping (JSON)), keyed by the field's name; `settings_kwargs(cls, values)` turns a handler's
values back into the dataclass's keyword arguments. `bind(handler, form)` gives Gradio a function that it calls with
the form's values by name (`inputs_kwargs=form`): the handler receives one dict, name -> value, and an API client
calls the endpoint with keywords (`client.predict(name="star", api_name="/train")`), every omitted one taking the
value the page shows at first."""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from typing import Any, Callable

from studio.loading import StudioError
from studio.utils.settings import SettingSpec, describe

# the separator between a method's name and its field's in a form key: `<method>__<field>`
METHOD_SEPARATOR = "__"


def _is_mapping(spec: SettingSpec) -> bool:
    return spec.type.replace("Optional[", "").startswith(("dict", "Dict"))


def _item_type(spec: SettingSpec) -> type:
    return int if "[int" in spec.type else float if "[float" in spec.type else str


def _shown(spec: SettingSpec, value: Any) -> Any:
    """What the field's component shows for `value`."""
    if value is None:
        return None if spec.kind in ("int", "float") else ""
    if spec.kind == "list":
        return "\n".join(str(item) for item in value)
    if _is_mapping(spec):
        return json.dumps(value) if value else ""
    return value


def _default_text(spec: SettingSpec) -> str:
    if spec.default in (None, "", [], {}):
        return "empty"
    if isinstance(spec.default, (list, tuple)):
        return ", ".join(map(str, spec.default))
    return json.dumps(spec.default) if isinstance(spec.default, dict) else str(spec.default)


def _info(spec: SettingSpec, unset_note: str | None) -> str:
    """The line under the field: its help, then its default (or what leaving it empty means)."""
    parts = [spec.help] if spec.help else []
    parts.append(unset_note or f"default {_default_text(spec)}")
    if spec.kind == "list":
        parts.append("one a line")
    elif _is_mapping(spec):
        parts.append("JSON")
    return "; ".join(parts)


def field_component(spec: SettingSpec, key: str, unset_note: str | None = None):
    """The component of one setting. With `unset_note`, it starts empty: empty means what the note says (e.g.
    the preset's value)."""
    import gradio as gr

    value = None if unset_note else _shown(spec, spec.default)
    common = {"label": spec.name, "info": _info(spec, unset_note), "elem_id": key.replace(METHOD_SEPARATOR, "-")}
    if spec.choices:
        choices = [("", "")] * bool(unset_note or spec.optional) + [(str(c), c) for c in spec.choices]
        return gr.Dropdown(choices, value="" if value is None else value, **common)
    if spec.kind == "bool":
        if unset_note:
            return gr.Dropdown([("", ""), ("yes", "true"), ("no", "false")], value="", **common)
        return gr.Checkbox(value=bool(value), **common)
    if spec.kind in ("int", "float"):
        return gr.Number(value=value, precision=0 if spec.kind == "int" else None, **common)
    lines = max(1, min(4, str(value or "").count("\n") + 1))
    return gr.Textbox(value="" if value is None else value, lines=lines, **common)


def settings_form(cls: type, *, prefix: str = "", skip: tuple[str, ...] = (),
                  unset: dict[str, str] | None = None) -> dict[str, Any]:
    """One component per field of the settings dataclass `cls` (made inside the current Gradio layout, the
    fields marked advanced in a closed accordion), keyed `prefix + field name`. `skip`: fields the page sets
    otherwise; `unset`: field -> a note saying what an empty value means (those fields start empty)."""
    import gradio as gr

    unset = unset or {}
    specs = [spec for spec in describe(cls) if spec.name not in skip]
    form = {prefix + s.name: field_component(s, prefix + s.name, unset.get(s.name)) for s in specs if not s.advanced}
    if any(s.advanced for s in specs):
        with gr.Accordion("More settings", open=False):
            form.update({prefix + s.name: field_component(s, prefix + s.name, unset.get(s.name))
                         for s in specs if s.advanced})
    return form


def _parsed(spec: SettingSpec, value: Any) -> Any:
    """The field's value from what its component holds; None for an empty one."""
    if value is None or (isinstance(value, str) and not value.strip() and spec.kind != "str"):
        return None
    if spec.kind == "bool":
        return value if isinstance(value, bool) else {"true": True, "false": False, "": None}[str(value)]
    if spec.kind in ("int", "float"):
        number = float(value)
        if spec.kind == "int" and not number.is_integer():
            raise StudioError(f"{spec.name} takes a whole number, got {value!r}")
        return int(number) if spec.kind == "int" else number
    if spec.kind == "list":
        items = [item.strip() for item in str(value).splitlines() if item.strip()]
        kind = _item_type(spec)
        if kind is not str:
            items = [part.strip() for item in items for part in item.split(",") if part.strip()]
        try:
            return [kind(item) for item in items]
        except ValueError:
            raise StudioError(f"{spec.name} takes {kind.__name__} values, one a line, got {value!r}") from None
    if _is_mapping(spec):
        try:
            mapping = json.loads(value) if str(value).strip() else {}
        except json.JSONDecodeError as exc:
            raise StudioError(f"{spec.name} takes a JSON mapping ({exc.msg})") from None
        if not isinstance(mapping, dict):
            raise StudioError(f"{spec.name} takes a JSON mapping, e.g. {{\"key\": 1}}")
        return mapping
    if value == "" and spec.optional:
        return None
    return value


def settings_kwargs(cls: type, values: dict[str, Any], *, prefix: str = "", skip: tuple[str, ...] = (),
                    unset: dict[str, str] | None = None, changed_only: bool = False) -> dict[str, Any]:
    """The keyword arguments of `cls` from a handler's `values` (keys as `settings_form` made them). An `unset`
    field left empty is not among them; with `changed_only`, neither is any field still at its default."""
    unset = unset or {}
    kwargs = {}
    for spec in describe(cls):
        key = prefix + spec.name
        if spec.name in skip or key not in values:
            continue
        value = _parsed(spec, values[key])
        if spec.name in unset:
            if value is not None and value != "":
                kwargs[spec.name] = value
        elif not changed_only or value != _parsed(spec, _shown(spec, spec.default)):
            if value is None and not spec.optional:
                raise StudioError(f"{spec.name} needs a value (default {spec.default})")
            kwargs[spec.name] = value
    return kwargs


def bind(handler: Callable[[dict[str, Any]], Any], form: dict[str, Any]) -> Callable[..., Any]:
    """A function for `event(fn, inputs_kwargs=form)`: Gradio passes each component's value under its name and
    `handler` gets them as one dict. Its signature names the form's keys, so the API endpoint takes keywords."""
    def call(**values: Any) -> Any:
        return handler(values)

    call.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in form])
    call.__name__ = getattr(handler, "__name__", "handler")
    return call


# ---- one form a registered method, shown for the method chosen ----

def _preset_notes(method) -> dict[str, str]:
    """field -> what an empty value means, for the fields a training preset of `method` sets."""
    notes: dict[str, list[str]] = {}
    for preset, values in method.presets.items():
        for field, value in (values.get("adapter") or {}).items():
            notes.setdefault(field, []).append(f"{preset} {value}")
    return {field: "empty: the preset's (" + ", ".join(parts) + ")" for field, parts in notes.items()}


@dataclass
class MethodForms:
    """One form a registered method of a kind, made from its config class (keys `<method>__<field>`), each in
    a group that is visible while its method is the one chosen."""

    forms: dict[str, dict[str, Any]]  # method -> key -> component
    groups: dict[str, Any]            # method -> gr.Group
    skip: tuple[str, ...] = ()

    def components(self) -> dict[str, Any]:
        """Every method's components, key -> component (inputs of a handler bound by name)."""
        return {key: component for form in self.forms.values() for key, component in form.items()}

    def follow(self, chooser) -> None:
        """Switching `chooser` (a Dropdown of method names) shows that method's form and hides the others."""
        import gradio as gr

        names = list(self.groups)
        chooser.change(lambda chosen: [gr.update(visible=name == chosen) for name in names], chooser,
                       [self.groups[name] for name in names], show_progress="hidden")

    def settings(self, method: str, values: dict[str, Any]) -> dict[str, Any]:
        """The chosen method's settings that the page changed, by name; a changed setting in another method's
        form is refused (it would otherwise be dropped without a word)."""
        from studio.adapters import get_method

        chosen = {}
        for name, form in self.forms.items():
            changed = settings_kwargs(get_method(name).config_class, {k: values[k] for k in form if k in values},
                                      prefix=name + METHOD_SEPARATOR, skip=self.skip,
                                      unset=_preset_notes(get_method(name)), changed_only=True)
            if name == method:
                chosen = changed
            elif changed:
                one = len(changed) == 1
                raise StudioError(f"{', '.join(sorted(changed))} {'is a setting' if one else 'are settings'} of "
                                  f"{name}; pick the {name} method or set {'it' if one else 'them'} back")
        return chosen


def method_forms(kind: str, selected: str, *, skip: tuple[str, ...] = ()) -> MethodForms:
    """The forms of every registered method of `kind` (made inside the current Gradio layout), the `selected`
    method's visible. `skip`: config fields the page sets otherwise."""
    import gradio as gr

    from studio.adapters import get_method, method_names

    forms, groups = {}, {}
    for name in method_names(kind):
        method = get_method(name)
        with gr.Group(visible=name == selected) as groups[name]:
            gr.Markdown(f"**{name}** settings", padding=True)
            forms[name] = settings_form(method.config_class, prefix=name + METHOD_SEPARATOR, skip=skip,
                                        unset=_preset_notes(method))
    return MethodForms(forms, groups, skip)
