"""Apply an app's .slugignore before the buildpacks run: each line is a glob; one without a
`/` matches a file or directory name anywhere, one with a `/` a path from the app's root
(Heroku's rules). Matching files and directories are deleted."""

from __future__ import annotations

import fnmatch
import os
import shutil
import sys
from pathlib import Path


def patterns(app: Path) -> list[str]:
    lines = (app / ".slugignore").read_text(errors="replace").splitlines()
    return [p.strip() for p in lines if p.strip() and not p.strip().startswith("#")]


def matches(rel: str, pattern: str) -> bool:
    if "/" in pattern.strip("/"):
        return fnmatch.fnmatchcase(rel, pattern.strip("/"))
    return fnmatch.fnmatchcase(rel.rsplit("/", 1)[-1], pattern.strip("/"))


def main(app: Path) -> None:
    rules = patterns(app)
    removed = 0
    for dirpath, dirnames, filenames in os.walk(app):
        for name in list(dirnames) + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(app).as_posix()
            if any(matches(rel, p) for p in rules):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                    dirnames.remove(name)
                else:
                    path.unlink()
                removed += 1
    print(f"-----> Removed {removed} file(s) and directories matching .slugignore")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
