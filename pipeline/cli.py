"""The preamble every job shares: parse the settings, print them, stop at ``--dry-run``, map errors
to exit codes (2: invalid configuration, naming the field; 1: the job could not be done)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

from pipeline.config import ConfigError, JobSettings

S = TypeVar("S", bound=JobSettings)


class JobError(RuntimeError):
    """Something the job needs cannot be used (a run, a checkpoint, data, the cluster); the message
    says which and why. Exit status 1."""


def run_job(
    settings_cls: type[S],
    body: Callable[[S], int | None],
    argv: list[str] | None = None,
    *,
    prog: str,
    resolve: Callable[[S], None] | None = None,
    echo: bool = True,
) -> int:
    """Parse ``argv`` into ``settings_cls``, let ``resolve`` fill derived values, print the resolved
    configuration (secrets masked; ``echo=False`` prints it only for ``--dry-run``), then run
    ``body``. Returns the exit status."""
    try:
        settings = settings_cls.from_cli(argv, prog=prog)
        if resolve:
            resolve(settings)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    if echo or settings.dry_run:
        print("resolved configuration:\n" + settings.dump(), flush=True)
    if settings.dry_run:
        return 0
    try:
        return body(settings) or 0
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    except JobError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
