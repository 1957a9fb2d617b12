"""Process types of a built app, for slugbuilder: the Procfile's (else the buildpack's
`default_process_types` from /app/.release), printed as JSON with the lines slugbuilder shows.
The release's `config_vars` become /app/.profile.d/000-config-vars.sh, as defaults the app's
own config vars override."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

PROCFILE_LINE = re.compile(r"^([A-Za-z0-9_-]+):\s*(.+?)\s*$")


def procfile_types(app: Path) -> list[str]:
    procfile = app / "Procfile"
    if not procfile.is_file():
        return []
    types = []
    for line in procfile.read_text(errors="replace").splitlines():
        m = PROCFILE_LINE.match(line)
        if m and m.group(1) not in types:
            types.append(m.group(1))
    return types


def release_sections(app: Path) -> dict[str, dict[str, str]]:
    """bin/release's YAML, as far as Heroku's buildpacks use it: top-level keys holding maps
    of `key: value` lines."""
    path = app / ".release"
    sections: dict[str, dict[str, str]] = {}
    if not path.is_file():
        return sections
    current: dict[str, str] | None = None
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            key = line.split(":", 1)[0].strip()
            current = sections.setdefault(key, {})
            continue
        m = re.match(r"^\s+([A-Za-z0-9_.-]+):\s*(.*?)\s*$", line)
        if m and current is not None:
            value = m.group(2)
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            current[m.group(1)] = value
    return sections


def main(app: Path, buildpack: str) -> None:
    release = release_sections(app)
    config_vars = release.get("config_vars") or {}
    if config_vars:
        profile = app / ".profile.d"
        profile.mkdir(exist_ok=True)
        lines = [
            f"export {k}=${{{k}:-{shlex.quote(v)}}}"
            for k, v in config_vars.items()
            if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)
        ]
        (profile / "000-config-vars.sh").write_text("\n".join(lines) + "\n")
    types = procfile_types(app)
    if types:
        lines = [f"       Procfile declares types -> {', '.join(types)}"]
    else:
        types = list((release.get("default_process_types") or {}).keys())
        shown = ", ".join(types) or "(none)"
        lines = [f"       Default process types for {buildpack} -> {shown}"]
    print(json.dumps({"types": types, "lines": lines}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
