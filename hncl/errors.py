"""Errors a user can fix. The CLI prints them as one line (`hncl COMMAND: error: ...`) and exits
1, with no traceback; everything else is a bug and keeps its traceback."""

from __future__ import annotations

from typing import Optional


class UserError(Exception):
    """A missing or unfinished input, a bad setting, a run that had to stop: the message says
    what happened, where, and what to do."""


class InputError(UserError, FileNotFoundError):
    """A file, folder, shard set or checkpoint a command needs is missing or unfinished."""


def user_error_in(exc: BaseException) -> Optional[BaseException]:
    """The user-fixable error behind `exc`, unwrapping what Ray Train and Ray tasks wrap around
    a worker's exception (WorkerGroupError.worker_failures, RayTaskError.cause, __cause__)."""
    seen = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (UserError, FileNotFoundError)):
            return e
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            todo.extend(failures[r] for r in sorted(failures))
        todo.extend([getattr(e, "cause", None), getattr(e, "controller_failure", None), e.__cause__])
    return None


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
