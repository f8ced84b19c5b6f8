"""The preamble every job shares: parse the settings, check them, print them, stop at ``--dry-run``,
map errors to exit codes (2: invalid configuration, naming the field; 1: the job could not be done).

The error is what an operator must see: it is printed before the resolved configuration when it is
found before any work, and otherwise as the last line, starting with ``error:``."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, get_args

from pydantic import BaseModel, SecretStr

from pipeline.cluster import in_ray_job
from pipeline.config import ConfigError, JobSettings, ServiceEnvSource
from pipeline.errors import JobError

S = TypeVar("S", bound=JobSettings)


def run_job(
    settings_cls: type[S],
    body: Callable[..., int | None],
    argv: list[str] | None = None,
    *,
    prog: str,
    resolve: Callable[[S], None] | None = None,
    preflight: Callable[[S], Any] | None = None,
    echo: bool = True,
) -> int:
    """Parse ``argv`` into ``settings_cls``, let ``resolve`` fill derived values, stop at ``--dry-run``
    (printing the configuration), run ``preflight`` (the checks before any work; skipped on
    ``--dry-run``), print the resolved configuration (secrets masked; ``echo=False``: only for
    ``--dry-run``), then run ``body(settings)``, or ``body(settings, preflight's result)``. Returns
    the exit status."""

    argv = sys.argv[1:] if argv is None else argv
    try:
        if in_ray_job():
            refuse_secret_flags(settings_cls, argv)
        settings = settings_cls.from_cli(argv, prog=prog)
        if resolve:
            resolve(settings)
        if settings.dry_run:
            print("resolved configuration:\n" + settings.dump(), flush=True)
            return 0
        args = (settings, preflight(settings)) if preflight else (settings,)
        if echo:
            print("resolved configuration:\n" + settings.dump(), flush=True)
        return body(*args) or 0
    except ConfigError as e:
        return _fail(e, 2)
    except JobError as e:
        return _fail(e, 1)


def _fail(error: Exception, status: int) -> int:
    message = str(error).strip()
    print(message if message.startswith("error:") else f"error: {message}", file=sys.stderr, flush=True)
    return status


def secret_flags(settings_cls: type[JobSettings]) -> Iterator[tuple[str, str, str]]:
    """(section, field, environment variable) of every secret setting of ``settings_cls``."""
    env = {where: var for var, where in ServiceEnvSource.MAPPING.items()}
    for section, info in settings_cls.model_fields.items():
        model = info.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            for name, field in model.model_fields.items():
                if SecretStr in (field.annotation, *get_args(field.annotation)):
                    yield section, name, env.get((section, name), f"DDPM_{section.upper()}__{name.upper()}")


def refuse_secret_flags(settings_cls: type[JobSettings], argv: list[str]) -> None:
    """``ConfigError`` for a secret given as a flag (``--storage.secret-access-key X``, or inside a
    section's JSON ``--storage '{...}'``): a Ray job keeps its entrypoint verbatim in the job list and
    the dashboard, so the secret must come from the environment instead."""
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        key, eq, value = arg[2:].partition("=")
        key = key.replace("_", "-")
        value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
        for section, name, var in secret_flags(settings_cls):
            flag = f"{section}.{name}".replace("_", "-")
            if key == flag or (key == section and (name in value or name.replace("_", "-") in value)):
                raise ConfigError(
                    f"error: --{flag} is refused inside a Ray job: the job's entrypoint, kept verbatim in "
                    f"`ray job list` and the dashboard, now holds the secret (rotate it); set {var} in the "
                    "Ray cluster's environment instead"
                )
