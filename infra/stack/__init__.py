"""Local real stack: SeaweedFS S3, an MLflow tracking server and a Ray head, all on 127.0.0.1.

    python -m infra.stack up      [--state-dir DIR] [--port-offset N] [--s3-port P] ... [--timeout S]
    python -m infra.stack status  [--state-dir DIR] [--json]
    python -m infra.stack env     [--state-dir DIR]      # `eval "$(python -m infra.stack env)"`
    python -m infra.stack down    [--state-dir DIR]

State lives in one directory (default <repo>/.stack, or $DDPM_STACK_DIR): generated S3 keys and Ray
token (0600), S3 data, the MLflow database, logs, the PIDs `up` started and `env.json`, the
standard variables a client needs (docs/stack.md, "The env contract"). `up` is idempotent; `down`
stops only the processes `up` recorded. Linux only (/proc).

    config.py     ports, the state directory and its private files
    processes.py  launching, finding and stopping a service's processes by PID; port owners
    services.py   the three services' commands and health checks; `Stack` (up, down, status, env)
    relay.py      SeaweedFS in a network of its own: its S3 port (and its master, on a private socket) the only ways in
    cli.py        the command line
"""

from infra.stack.cli import main
from infra.stack.config import BUCKETS, SERVICES, StackConfig, StackError, load_env
from infra.stack.services import Stack, UpResult

__all__ = ["BUCKETS", "SERVICES", "Stack", "StackConfig", "StackError", "UpResult", "load_env", "main"]
