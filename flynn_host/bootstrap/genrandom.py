"""Flynn's `gen-random` bootstrap action: a random value for later steps (a password, a key).

`{"length": N, "encoding": "hex"|"base64"|"uuid", "data": "..."}`: N random bytes (default 16)
hex- or URL-safe-base64-encoded, or a random UUID; a non-empty `data` is used as it is instead
(an operator's own key). The step data is `{"data": VALUE}`, which a later step reads with
`{{ (index .StepData "ID").Data }}`. The value is a secret: the bootstrap output never shows it
(`State.secrets`), in text or `--json`, not even inside a later step's data.
"""

from __future__ import annotations

import base64
import secrets
import uuid
from typing import Any

from flynn_host.bootstrap.runner import Action, State, StepError

ENCODINGS = ("hex", "base64", "uuid")
DEFAULT_LENGTH = 16
MAX_LENGTH = 4096


class GenRandom(Action):
    def __init__(self, step: dict[str, Any]) -> None:
        super().__init__(step)
        self.length = step.get("length") or DEFAULT_LENGTH
        if not isinstance(self.length, int) or isinstance(self.length, bool):
            raise StepError(f"length must be a number of bytes, not {self.length!r}")
        if not 1 <= self.length <= MAX_LENGTH:
            raise StepError(f"length must be between 1 and {MAX_LENGTH} bytes")
        self.encoding = step.get("encoding") or "hex"
        if self.encoding not in ENCODINGS:
            raise StepError(f"encoding {self.encoding!r} is not one of {', '.join(ENCODINGS)}")
        self.data = step.get("data") or ""
        if not isinstance(self.data, str):
            raise StepError("data must be a string")

    def value(self) -> str:
        if self.data:
            return self.data
        if self.encoding == "uuid":
            return str(uuid.uuid4())
        raw = secrets.token_bytes(self.length)
        if self.encoding == "base64":
            return base64.urlsafe_b64encode(raw).decode().rstrip("=")
        return raw.hex()

    def run(self, state: State) -> Any:
        value = self.value()
        state.secrets.add(value)
        return {"data": value}
