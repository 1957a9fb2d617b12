"""The buildpacks' tests' images: slugbuilder and slugrunner (`stackbuild.Stacks`), mounted by
each run as root."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from stackbuild import Stacks

from flynn_host.dev.host import require_programs


@pytest.fixture(scope="session")
def stacks() -> Iterator[Stacks]:
    if os.geteuid() != 0:
        pytest.skip("the buildpacks' tests mount the slugbuilder and slugrunner images: root only")
    require_programs("unshare", "mount", "chroot", "setpriv")
    with Stacks() as images:
        yield images
