"""Helpers for the network-namespace tests (a module of its own: test modules import it by a
name no other test directory uses, unlike `conftest`)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


@dataclass
class TwoHosts:
    a: str  # netns names
    b: str
    ip_a: str = "10.211.0.1"
    ip_b: str = "10.211.0.2"
