"""Printing step events the way Flynn's `flynn-host bootstrap` does.

Text (to standard error, like Go's `log` with microsecond times): `15:04:05.000000 ACTION ID`
when a step starts, `... ACTION ID done` when it finishes, `... ACTION MESSAGE` for progress and
`... ACTION ID error: MESSAGE` when it fails; a step whose data is a message (`log`) prints
`... ACTION ID MESSAGE` when done, as Flynn prints a step's data in text form. `--json`: one
`StepInfo` JSON object per line on standard output,
`{"id", "action", "data"?, "state", "error"?, "ts"}`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import datetime
from typing import TextIO

from flynn_host.bootstrap.runner import StepInfo


def text_logger(stream: TextIO | None = None) -> Callable[[StepInfo], None]:
    def log(info: StepInfo) -> None:
        out = stream or sys.stderr
        t = datetime.now().strftime("%H:%M:%S.%f")
        if info.state == "start":
            line = f"{info.action} {info.id}"
        elif info.state == "info":
            line = f"{info.action} {info.id}: {info.data}"
        elif info.state == "done" and isinstance(info.data, dict) and "message" in info.data:
            line = f"{info.action} {info.id} {info.data['message']}"
        elif info.state == "done":
            line = f"{info.action} {info.id} done"
        else:
            line = f"{info.action} {info.id} error: {info.error}"
        print(f"{t} {line}", file=out, flush=True)

    return log


def json_logger(stream: TextIO | None = None) -> Callable[[StepInfo], None]:
    def log(info: StepInfo) -> None:
        out = stream or sys.stdout
        print(json.dumps(info.to_json()), file=out, flush=True)

    return log
