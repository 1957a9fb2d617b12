"""Flynn's `log` bootstrap action: a message for the operator, such as the closing line that
says how to add the cluster to the `flynn` CLI.

`{"output": "..."}` (rendered like any step, so it can name earlier steps' data): the step data
is `{"message": OUTPUT}`, printed in full by the text output and in the `done` event of
`--json`. This is the one place a manifest shows a secret on purpose: a log step's message is
not redacted (the closing line carries the controller key the operator must paste).
"""

from __future__ import annotations

from typing import Any

from flynn_host.bootstrap.runner import Action, State, StepError


class Log(Action):
    shows_secrets = True

    def __init__(self, step: dict[str, Any]) -> None:
        super().__init__(step)
        self.output = step.get("output")
        if not isinstance(self.output, str):
            raise StepError("output must be a string (the message to print)")

    def run(self, state: State) -> Any:
        return {"message": self.output}
