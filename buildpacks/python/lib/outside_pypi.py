"""Prints the lines of a requirements file (and of the files it includes with -r/-c) that ask
pip for something outside PyPI (a VCS checkout, a URL on another host, another index), which
the build cannot reach: `outside_pypi.py requirements.txt`."""

import re
import sys
from pathlib import Path
from urllib.parse import urlparse

PYPI_HOSTS = {"pypi.org", "files.pythonhosted.org", "pypi.python.org"}
VCS = re.compile(r"\b(git|hg|svn|bzr)\+")
URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)
INCLUDE = re.compile(r"^(-r|--requirement|-c|--constraint)[\s=]+(\S+)")


def outside(path: Path, seen: set[Path]) -> list[str]:
    if path in seen or not path.is_file():
        return []
    seen.add(path)
    found = []
    for raw in path.read_text(errors="replace").splitlines():
        line = re.sub(r"(^|\s)#.*", "", raw).strip()
        if not line:
            continue
        include = INCLUDE.match(line)
        if include:
            found += outside(path.parent / include.group(2), seen)
            continue
        if VCS.search(line):
            found.append(f"{path.name}: {line}")
            continue
        for url in URL.findall(line):
            parsed = urlparse(url)
            if parsed.scheme != "file" and parsed.hostname not in PYPI_HOSTS:
                found.append(f"{path.name}: {line}")
                break
    return found


if __name__ == "__main__":
    for entry in outside(Path(sys.argv[1]), set()):
        print(entry)
