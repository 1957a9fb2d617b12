"""The shim's program: `python -m flynn_host.runtime.shim JOBDIR` from source, `flynn-host shim
JOBDIR` frozen (the CLI calls `main`), or `... JOBS_DIR --idle` for a pre-started shim that waits
on stdin for its job directory. It starts the container (`startup`), reports `{"pid": N}` or
`{"error": "..."}` as one JSON line on stdout, and only then imports `serving` (asyncio and
the rest), which runs until the container has exited: the import is off the job's start.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

from flynn_host.atomicfile import write_atomic
from flynn_host.runtime.shim.startup import (
    Container,
    ShimConfig,
    StartError,
    json_line,
    set_subreaper,
)


def _report(message: dict[str, Any]) -> None:
    """Tell the daemon how the start went, then let go of stdout (the daemon may go away)."""
    with contextlib.suppress(OSError):
        os.write(1, json_line(message))
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[1] == "--idle":
        # a pre-started shim (the daemon keeps a few ready): everything is imported, and the
        # job directory arrives on stdin when a job starts; EOF means no job is coming
        from flynn_host.runtime.shim import serving  # noqa: F401

        line = sys.stdin.readline().strip()
        if not line:
            return 0
        args = [line]
    if len(args) != 1:
        print("usage: python -m flynn_host.runtime.shim JOBDIR | JOBS_DIR --idle", file=sys.stderr)
        return 2
    job_dir = os.path.abspath(args[0])
    # tracebacks go to the job directory, where the daemon's operator can find them
    with contextlib.suppress(OSError):
        err = os.open(os.path.join(job_dir, "shim.err"), os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                      0o600)  # fmt: skip
        os.dup2(err, 2)
        os.close(err)
    os.chdir("/")  # do not keep whatever directory the daemon ran in busy
    try:
        config = ShimConfig.load(os.path.join(job_dir, "shim.json"))
        set_subreaper()
        write_atomic(os.path.join(job_dir, "shim.pid"), f"{os.getpid()}\n".encode(), mode=0o600)
        container = Container(job_dir, config)
        pid = container.start()
    except StartError as e:
        _report({"error": str(e)})
        return 1
    except Exception as e:
        import traceback

        traceback.print_exc()
        _report({"error": f"shim: {e}"})
        return 1
    _report({"pid": pid})
    from flynn_host.runtime.shim import serving

    return serving.serve(container)


if __name__ == "__main__":
    sys.exit(main())
