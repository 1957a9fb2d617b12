"""The `flynn-host` command as an operator meets it: one-line errors for bad input, `version`,
and a TTY job that gets what was typed before it attached."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

from .conftest import ROOT, needs_root, read_until

pytestmark = needs_root


def test_bad_input_gives_a_one_line_error_not_a_traceback(daemon, tmp_path):
    not_json = tmp_path / "manifest.json"
    not_json.write_text("[1]")
    cases = [
        ("run", "nosuchimage", "true"),
        ("run", "Busybox", "true"),
        ("run", str(tmp_path / "missing.json"), "true"),
        ("run", str(not_json), "true"),
        ("image", "import", str(tmp_path / "missing.json")),
        ("log", "nosuch-1"),
        ("log", "-f", "nosuch-1"),
        ("inspect", "nosuch-1"),
        ("stop", "nosuch-1"),
        ("signal", "nosuch-1", "TERM"),
    ]
    for args in cases:
        out = daemon.run_cli(*args)
        assert out.returncode == 1, (args, out.stderr)
        assert "Traceback" not in out.stderr, args
        lines = [line for line in out.stderr.splitlines() if not line.startswith("importing ")]
        assert len(lines) == 1 and lines[0].startswith(f"flynn-host {args[0]}: "), (args, lines)
    missing = daemon.run_cli("run", "nosuchimage", "true").stderr
    assert missing == (
        "flynn-host run: image 'nosuchimage' not found: no "
        f"{daemon.cli_env['FLYNN_IMAGES']}/nosuchimage/manifest.json\n"
    )
    assert daemon.run_cli("ps", "-aq").stdout == ""  # nothing was started


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flynn_host.cli.main", *args],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)  # fmt: skip


def test_version_and_version_release():
    from flynn_host import __version__

    for args in (["version"], ["version", "--release"], ["--version"]):
        out = cli(*args)
        assert (out.returncode, out.stdout, out.stderr) == (0, f"{__version__}\n", ""), args
    helped = cli("help", "version")
    assert helped.returncode == 0 and "--release" in helped.stdout
    bad = cli("version", "--nope")
    assert bad.returncode == 2 and "usage: flynn-host version [--release]" in bad.stderr


def test_keys_typed_before_a_tty_job_attaches_reach_it(daemon):
    pid, fd = pty.fork()
    if pid == 0:  # child: the CLI, with the pty as its terminal
        os.environ.update(daemon.cli_env)
        os.chdir(ROOT)
        script = 'read line; echo "got:$line"'
        os.execv(sys.executable, [sys.executable, "-m", "flynn_host.cli.main", "run",
                                  "busybox", "sh", "-c", script])  # fmt: skip
    try:
        # typed at once: the command has not even started, let alone attached to the job
        os.write(fd, b"typed early\n")
        out = read_until(fd, b"got:")
        out += read_until(fd, b"\n", timeout=5)
        assert b"got:typed early" in out, out
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)
