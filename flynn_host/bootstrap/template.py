"""The subset of Go's text/template that Flynn's bootstrap manifest uses.

Flynn renders `bootstrap-manifest.json` as a Go template before parsing it as JSON. We support
what a Layer 0 manifest needs and refuse everything else by name, rather than guessing:

- `{{ getenv "NAME" }}` (or `{{ getenv \"NAME\" }}` inside a JSON string): the environment
  variable, or "" when unset. The escaped form is only ever written inside a JSON string, so
  its value is JSON-escaped there (a PEM certificate's line breaks become `\n`): Go would
  insert them raw and make the manifest invalid JSON;
- `{{ .Singleton }}` (`true`/`false`) and `{{ .SortedHostIPs }}` (a list, for `range`);
- `{{ range $ip := .SortedHostIPs }}...{{ $ip }}...{{ end }}`, `{{ range $i, $ip := ... }}`
  (`$i` counts from 0) and `{{ range .X }}...{{ . }}...{{ end }}`;
- `{{ if PIPELINE }}...{{ else }}...{{ end }}` (Go's truth: false, "", 0 and empty lists are
  false);
- `{{- ` / ` -}}` trim the white space beside the action, as in Go;
- `{{ (index .StepData "ID").Field }}`: a field of an earlier step's data, named as Go names
  the field whose JSON key it is: `.Data` is the key `data`, `.CACert` the key `ca_cert`,
  `.ControllerURL` the key `controller_url` (the key as written, then with its first letter
  lower-cased, then in snake case). Step data exists only once that step has run, so the whole
  manifest is rendered first without it (these actions are kept as they are) and each step is
  rendered again just before it runs (`render_step`).

Values are inserted as they are (no JSON escaping), as Go's text/template does.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ACTION_RE = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
# inside a JSON string the quotes are escaped (`{{ getenv \"NAME\" }}`), as in Flynn's manifest
GETENV_RE = re.compile(r'^getenv\s+(\\?)"(\w+)\1"$')
RANGE_RE = re.compile(r"^range\s+(?:(?:(\$\w+)\s*,\s*)?(\$\w+)\s*:=\s*)?(.+)$")
STEPDATA_RE = re.compile(r'^\(index\s+\.StepData\s+(\\?)"([\w.-]+)\1"\)\.([A-Za-z]\w*)$')


class TemplateError(ValueError):
    pass


@dataclass
class _Node:
    kind: str  # text | expr | range | if
    text: str = ""
    line: int = 0
    var: str | None = None
    body: list[_Node] = field(default_factory=list)
    orelse: list[_Node] = field(default_factory=list)
    index_var: str | None = None


def _tokens(src: str) -> list[tuple[str, str, int]]:
    """("text", s, line) and ("action", inner, line), with Go's `{{-`/`-}}` trimming applied."""
    out: list[tuple[str, str, int]] = []
    pos = 0
    trim_next = False
    for m in ACTION_RE.finditer(src):
        text = src[pos : m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        out.append(("text", text, src.count("\n", 0, pos) + 1))
        out.append(("action", m.group(2).strip(), src.count("\n", 0, m.start()) + 1))
        trim_next = bool(m.group(3))
        pos = m.end()
    tail = src[pos:]
    out.append(("text", tail.lstrip() if trim_next else tail, src.count("\n", 0, pos) + 1))
    return out


def _parse(
    tokens: list[tuple[str, str, int]], i: int, closers: tuple[str, ...]
) -> tuple[list[_Node], int, str]:
    nodes: list[_Node] = []
    while i < len(tokens):
        kind, value, line = tokens[i]
        i += 1
        if kind == "text":
            if value:
                nodes.append(_Node("text", value, line))
            continue
        word = value.split(None, 1)[0] if value else ""
        if word in closers:
            return nodes, i, word
        if word in ("end", "else"):
            raise TemplateError(f"line {line}: unexpected {{{{ {value} }}}}")
        if word == "range":
            m = RANGE_RE.match(value)
            if not m:
                raise TemplateError(f"line {line}: unsupported range form {{{{ {value} }}}}")
            body, i, closer = _parse(tokens, i, ("end", "else"))
            if closer != "end":
                raise TemplateError(f"line {line}: {{{{ else }}}} in range is not supported")
            nodes.append(
                _Node("range", m.group(3).strip(), line, m.group(2), body, index_var=m.group(1))
            )
        elif word == "if":
            body, i, closer = _parse(tokens, i, ("end", "else"))
            orelse: list[_Node] = []
            if closer == "else":
                orelse, i, _ = _parse(tokens, i, ("end",))
            nodes.append(_Node("if", value[2:].strip(), line, None, body, orelse))
        else:
            nodes.append(_Node("expr", value, line))
    if closers:
        raise TemplateError("unexpected end of template: missing {{ end }}")
    return nodes, i, ""


class _Deferred(str):
    """An action left for later: rendered as it was written."""


def _step_data(m: re.Match[str], line: int, data: Mapping[str, Any]) -> Any:
    if "StepData" not in data:
        return _Deferred("{{ " + m.group(0) + " }}")
    step, name = m.group(2), m.group(3)
    if step not in data["StepData"]:
        raise TemplateError(f"line {line}: step {step!r} has no data (has it run yet?)")
    value = data["StepData"][step]
    for key in json_keys(name):
        if isinstance(value, Mapping) and key in value:
            return value[key]
    raise TemplateError(f"line {line}: the data of step {step!r} has no field {name}")


def json_keys(field_name: str) -> list[str]:
    """The JSON keys a Go field name may stand for: `Data` -> data, `CACert` -> ca_cert,
    `ControllerURL` -> controller_url."""
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", field_name).lower()
    return list(dict.fromkeys([field_name, field_name[0].lower() + field_name[1:], snake]))


def _eval(expr: str, line: int, data: Mapping[str, Any], scope: dict[str, Any]) -> Any:
    m = GETENV_RE.match(expr)
    if m:
        value = os.environ.get(m.group(2), "")
        # `\"NAME\"`: the action sits inside a JSON string, where the value must be escaped
        return json.dumps(value, ensure_ascii=False)[1:-1] if m.group(1) else value
    m = STEPDATA_RE.match(expr)
    if m:
        return _step_data(m, line, data)
    if expr == ".":
        return scope["."]
    if re.fullmatch(r"\$\w+", expr):
        if expr not in scope:
            raise TemplateError(f"line {line}: undefined variable {expr}")
        return scope[expr]
    if re.fullmatch(r"\.[A-Za-z_]\w*", expr):
        name = expr[1:]
        if name not in data:
            known = ", ".join("." + k for k in sorted(data))
            raise TemplateError(f"line {line}: unknown field {expr} (available: {known})")
        return data[name]
    raise TemplateError(
        f"line {line}: unsupported template construct {{{{ {expr} }}}} (supported: getenv, "
        '.Field, (index .StepData "ID").Field, $var, range, if/else, end)'
    )


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + " ".join(_format(v) for v in value) + "]"
    return str(value)


def _render(nodes: list[_Node], data: Mapping[str, Any], scope: dict[str, Any]) -> str:
    out = []
    for n in nodes:
        if n.kind == "text":
            out.append(n.text)
        elif n.kind == "expr":
            out.append(_format(_eval(n.text, n.line, data, scope)))
        elif n.kind == "range":
            items = _eval(n.text, n.line, data, scope)
            if not isinstance(items, list | tuple):
                raise TemplateError(f"line {n.line}: range over {n.text}, which is not a list")
            for i, item in enumerate(items):
                inner = {**scope, ".": item}
                if n.var:
                    inner[n.var] = item
                if n.index_var:
                    inner[n.index_var] = i
                out.append(_render(n.body, data, inner))
        elif n.kind == "if":
            cond = _eval(n.text, n.line, data, scope)
            out.append(_render(n.body if cond else n.orelse, data, scope))
    return "".join(out)


def render(src: str, data: Mapping[str, Any]) -> str:
    """Render `src` with the fields `data` (e.g. {"Singleton": True, "SortedHostIPs": [...]})."""
    nodes, _, _ = _parse(_tokens(src), 0, ())
    return _render(nodes, data, {".": data})


def render_step(value: Any, data: Mapping[str, Any]) -> Any:
    """`value` (a parsed step) with every string that still holds an action rendered."""
    if isinstance(value, str):
        return render(value, data) if "{{" in value else value
    if isinstance(value, list):
        return [render_step(v, data) for v in value]
    if isinstance(value, dict):
        return {k: render_step(v, data) for k, v in value.items()}
    return value
