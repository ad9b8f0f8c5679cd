"""Errors that belong to one input record; streams/ turns them into dead letters."""

from __future__ import annotations


class BadInput(ValueError):
    """The record cannot be processed as sent. `reason` is a short stable code for dashboards and
    dead-letter consumers; `detail` is the human-readable explanation."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
