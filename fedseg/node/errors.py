"""Exceptions raised by the node package.

Every error a node raises about its local data names the offending file(s),
relative to the site folder, so that a data owner can fix the folder without
reading code and without the node ever shipping pixels anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["MAX_LISTED", "ActionRefused", "DatasetError", "NodeError"]

#: How many problems a :class:`DatasetError` message lists before summarising.
#: A broken export can produce thousands of offenders; ten is enough to see the
#: pattern without flooding a terminal or a log line.
MAX_LISTED = 10


class NodeError(Exception):
    """Base class for errors raised by ``fedseg.node``."""


class DatasetError(NodeError):
    """A site folder, or a request against it, is invalid.

    Validation collects every offender before raising, so one run of the
    indexer reports the whole list instead of one file per attempt.

    Args:
        problems: One problem, or several. Each problem is a sentence that
            starts with the offending file relative to the site folder, e.g.
            ``"masks/007.png: size 120x128 differs from its image
            images/007.png (128x128)"``.
        where: Optional context (usually the site folder) shown before the
            list of problems.

    Attributes:
        problems: All problems, including those left out of the message.
        where: The context given at construction, or ``None``.

    Raises:
        ValueError: If ``problems`` is empty, since an error that names no
            problem is itself a bug.
    """

    def __init__(self, problems: str | Sequence[str], *, where: str | None = None) -> None:
        items = (problems,) if isinstance(problems, str) else tuple(problems)
        if not items:
            raise ValueError("DatasetError needs at least one problem")
        self.problems: tuple[str, ...] = items
        self.where = where
        super().__init__(self._format())

    def _format(self) -> str:
        prefix = f"{self.where}: " if self.where else ""
        if len(self.problems) == 1:
            return prefix + self.problems[0]
        shown = self.problems[:MAX_LISTED]
        lines = [f"{prefix}{len(self.problems)} problems:"]
        lines += [f"  - {p}" for p in shown]
        hidden = len(self.problems) - len(shown)
        if hidden:
            lines.append(f"  ... and {hidden} more")
        return "\n".join(lines)


class ActionRefused(NodeError):
    """A whitelisted action declines a well-formed request, with the error code to answer.

    Args:
        code: An ``ErrorCode`` value of the protocol, e.g. ``"declined"``.
        message: Why, naming the node and what the owner would have to change.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
