"""What bin/compile needs from the app's composer.json (and composer.lock), printed as shell
assignments: the packages it requires from Packagist, the extensions it requires, its PHP
constraint and whether the stack's PHP meets it, its document root and whether it autoloads.

    python3 composer.py /app 8.2.36
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

PLATFORM = re.compile(
    r"^(php(-64bit|-ipv6|-zts|-debug)?|hhvm|composer(-plugin|-runtime)?-api|lib-.*)$"
)


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def satisfies(version: str, constraint: str) -> bool:
    """Composer's common constraint forms (|| alternatives of space/comma-separated parts:
    ^, ~, >=, >, <=, <, =, !=, x.* wildcards); anything else counts as met."""
    have = version_tuple(version)
    for alternative in re.split(r"\s*\|\|?\s*", constraint.strip()):
        if all(_part(have, part) for part in re.split(r"[\s,]+", alternative) if part):
            return True
    return False


def _part(have: tuple[int, ...], part: str) -> bool:
    match = re.match(r"^(\^|~|>=|<=|>|<|==?|!=)?v?([\d.*x]+)", part)
    if not match:
        return True
    op, text = match.group(1) or "=", match.group(2)
    want = version_tuple(text.replace("*", "").replace("x", ""))
    if not want:
        return True
    pad = have + (0,) * 3
    if "*" in text or "x" in text:
        return pad[: len(want)] == want
    full = want + (0,) * (3 - len(want))
    if op == "^":
        upper = (want[0] + 1,) if want[0] > 0 else want[:2]
        if want[0] == 0 and len(want) > 1:
            upper = (0, want[1] + 1)
        return full <= pad[:3] and pad[: len(upper)] < upper
    if op == "~":
        upper = (want[0] + 1,) if len(want) <= 2 else (want[0], want[1] + 1)
        return full <= pad[:3] and pad[: len(upper)] < upper
    if op in ("=", "=="):
        return pad[: len(want)] == want
    if op == "!=":
        return pad[: len(want)] != want
    return {">=": pad[:3] >= full, ">": pad[:3] > full, "<=": pad[:3] <= full, "<": pad[:3] < full}[
        op
    ]


def main(app: Path, php_version: str) -> None:
    composer = (
        json.loads((app / "composer.json").read_text()) if (app / "composer.json").exists() else {}
    )
    require = composer.get("require") or {}
    packages = [n for n in require if not PLATFORM.match(n) and not n.startswith("ext-")]
    lock = app / "composer.lock"
    if lock.exists():
        locked = json.loads(lock.read_text()).get("packages") or []
        packages += [p["name"] for p in locked if p.get("name") and p["name"] not in packages]
    extensions = [n.removeprefix("ext-") for n in require if n.startswith("ext-")]
    php = str(require.get("php", ""))
    docroot = str(((composer.get("extra") or {}).get("heroku") or {}).get("document-root", ""))
    values = {
        "packages": " ".join(packages),
        "extensions": " ".join(extensions),
        "php_constraint": php,
        "php_ok": "yes" if not php or satisfies(php_version, php) else "",
        "document_root": docroot.strip("/"),
        "autoloads": "yes" if composer.get("autoload") or composer.get("autoload-dev") else "",
    }
    for name, value in values.items():
        print(f"{name}={shlex.quote(value)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
