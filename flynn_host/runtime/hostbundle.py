"""The host bundle: this host's own `flynn-host` program, mounted read-only at `/.flynn-host` in
a job with `config.host_bundle`, so that a platform component's job runs exactly the host's
version (`/.flynn-host/flynn-host component <name>`). See docs/host.md#images-and-the-host-bundle.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from flynn_host.runtime.bundle import HOST_BUNDLE, ro_bind


def host_bundle_mounts(launcher_dir: Path) -> list[dict[str, Any]]:
    """Mounts that give a job this host's own flynn-host at /.flynn-host (read-only), so a
    component job runs exactly the host's version. Frozen, that is the PyInstaller bundle's
    directory. From a source tree, the tree and its virtualenv are mounted at their own
    paths and /.flynn-host holds a launcher that runs the virtualenv's Python on them; the
    job's image must then have the Python the virtualenv was made from (the `components`
    image's /usr/bin/python3.11, as on Debian 12 hosts)."""
    if getattr(sys, "frozen", False):
        return [ro_bind(Path(sys.executable).parent, HOST_BUNDLE)]
    import flynn_host

    tree = Path(flynn_host.__file__).resolve().parents[1]
    venv = Path(sys.prefix)
    # 0755, unlike the job directories: it holds only this two-line launcher, no secret, and
    # jobs running as any user must be able to run it
    launcher_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    launcher = launcher_dir / "flynn-host"
    launcher.write_text(f'#!/bin/sh\nexec {venv}/bin/python -m flynn_host.cli.main "$@"\n')
    launcher.chmod(0o755)
    mounts = [ro_bind(launcher_dir, HOST_BUNDLE), ro_bind(tree, tree)]
    if not venv.is_relative_to(tree):
        mounts.append(ro_bind(venv, venv))
    return mounts
