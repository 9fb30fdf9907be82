"""Fixtures of the audit trail tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.audittrail import OpenWriter


@pytest.fixture
def open_writer() -> Iterator[type[OpenWriter]]:
    """Opens writers; any a test leaves open (it failed first) are rolled back."""
    writers: list[OpenWriter] = []

    class Tracked(OpenWriter):
        def __init__(self, action: str = "slow.writer") -> None:
            writers.append(self)
            super().__init__(action)

    yield Tracked
    for writer in writers:
        if writer.open:
            writer.finish(commit=False)
