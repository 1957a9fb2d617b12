"""What every test directory shares (tests/, plugins/*/tests/): the `needs` marker.

`@pytest.mark.needs("runc", "/bin/busybox")` on a test (or `pytestmark` of a module) says which
programs it runs. They are all ones `make dev` installs, so a run as root fails such a test when
one is missing, saying so, rather than skip it quietly; other runs skip it
(`flynn_host.dev.host.require_programs`)."""

from __future__ import annotations

import pytest

from flynn_host.dev.host import require_programs


@pytest.hookimpl(tryfirst=True)  # before the fixtures, which may run the programs already
def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs"):
        require_programs(*mark.args)
