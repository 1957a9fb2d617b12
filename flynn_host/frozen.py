"""Running from the PyInstaller bundle (`make dist`, packaging/flynn-host.spec) rather than from
the source tree: how to tell, how this program runs itself, and the environment its children get.

PyInstaller's bootloader changes the environment before Python starts: on Linux a one-directory
bundle prepends its `_internal/` directory to `LD_LIBRARY_PATH` (saving a value it replaced in
`LD_LIBRARY_PATH_ORIG`) and re-executes itself so the dynamic loader sees it, and it leaves
`_PYI_*` markers describing this process. Every program flynn-host starts (runc, git, etcd,
mksquashfs, ...) must get the environment flynn-host itself was given instead: with the bundle's
libraries first in its search path, `sh` or `git` would load the bundle's copies of libz, libssl,
libffi, ... and can fail with symbol errors. `restore_environment()`, called first thing in
`flynn_host.cli.main.main`, undoes both in `os.environ`, which every child inherits.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

LIBRARY_PATH = "LD_LIBRARY_PATH"
SAVED_LIBRARY_PATH = "LD_LIBRARY_PATH_ORIG"

# The bootloader's markers. Left in place, a child running this same executable (a shim, a
# component) would take itself for a restarted bootloader whose library path is already set up,
# skip setting it up, and run against the system's libraries. Without them it starts afresh.
BOOTLOADER_MARKERS = (
    "_PYI_ARCHIVE_FILE",
    "_PYI_APPLICATION_HOME_DIR",
    "_PYI_PARENT_PROCESS_LEVEL",
    "_PYI_LINUX_PROCESS_NAME",
    "_PYI_SPLASH_IPC",
    "_MEIPASS2",  # PyInstaller < 6
)


def is_frozen() -> bool:
    """True when running from the PyInstaller bundle."""
    return bool(getattr(sys, "frozen", False)) and hasattr(sys, "_MEIPASS")


def bundle_dir() -> Path | None:
    """The bundle's top directory (holding the `flynn-host` executable), or None from source."""
    return Path(sys.executable).resolve().parent if is_frozen() else None


def self_command() -> list[str]:
    """The argument list that runs this flynn-host: the bundle's executable when frozen, else
    this interpreter with the CLI module. Append a command (`shim`, `daemon`, ...)."""
    if is_frozen():
        return [sys.executable]
    return [sys.executable, "-m", "flynn_host.cli.main"]


def restore_environment(environ: MutableMapping[str, str] | None = None) -> None:
    """Give `environ` (default `os.environ`) back the values the program was started with.

    Does nothing when not frozen. Idempotent.

    Changing `os.environ` after start-up does not hurt this process: glibc's dynamic loader read
    `LD_LIBRARY_PATH` once, when the bootloader re-executed itself, and turned it into the search
    list it keeps for the process's lifetime, so later `dlopen`s (extension modules imported
    lazily, `ctypes`) still find the bundle's libraries. What changes is only what children
    inherit: `os.environ` writes through to the C environment (`putenv`), which `subprocess`
    and asyncio's subprocesses pass on when given no `env`, and which `{**os.environ, ...}`
    copies start from.
    """
    if not is_frozen():
        return
    env = os.environ if environ is None else environ
    saved = env.pop(SAVED_LIBRARY_PATH, None)
    if saved is not None:
        env[LIBRARY_PATH] = saved
    elif LIBRARY_PATH in env:
        # there was none before (or the value is already restored): drop the bundle's entry only
        ours = {os.path.realpath(str(sys._MEIPASS))}  # type: ignore[attr-defined]
        parts = env[LIBRARY_PATH].split(":")
        kept = [p for p in parts if not p or os.path.realpath(p) not in ours]
        if any(kept):
            env[LIBRARY_PATH] = ":".join(kept)
        else:
            del env[LIBRARY_PATH]
    for name in BOOTLOADER_MARKERS:
        env.pop(name, None)
