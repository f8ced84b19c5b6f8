"""`python -m infra.stack up|down|status|env` (also installed as `ddpm-stack`)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from infra.stack.config import (
    DEFAULT_PORTS,
    DEFAULT_STATE_DIR,
    HOST,
    HOST_ENV,
    OFFSET_ENV,
    PORT_ENV,
    SERVICES,
    STATE_ENV,
    StackConfig,
    StackError,
    load_env,
)
from infra.stack.node import JoinConfig, join, read_token
from infra.stack.services import Stack


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", help=f"state directory (${STATE_ENV}, default {DEFAULT_STATE_DIR})")
    only = argparse.ArgumentParser(add_help=False)
    only.add_argument("--only", default=",".join(SERVICES), help="comma-separated subset of s3,mlflow,ray")
    parser = argparse.ArgumentParser(
        prog="python -m infra.stack",
        description="Local real stack: SeaweedFS S3, an MLflow tracking server and a Ray head, all on 127.0.0.1.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", parents=[common, only], help="start or reuse the stack and wait until it is ready")
    up.add_argument(
        "--host",
        help=f"address the services listen on (${HOST_ENV}, default {HOST}); another address of this machine "
        "lets other hosts join (SeaweedFS's S3 port is relayed there, its other ports stay in its private "
        "network)",
    )
    up.add_argument("--port-offset", type=int, help=f"added to every default port (${OFFSET_ENV})")
    for name, var in PORT_ENV.items():
        up.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"${var}, default {DEFAULT_PORTS[name]}")
    up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for readiness")
    sub.add_parser("down", parents=[common, only], help="stop the processes `up` recorded")
    st = sub.add_parser("status", parents=[common], help="health and URL of each service (exit 1 if any is down)")
    st.add_argument("--json", action="store_true")
    sub.add_parser("env", parents=[common], help="print `export K=V` lines for a shell to source")
    jn = sub.add_parser("join", help="run a Ray worker node on this host, joined to a stack's head (blocks)")
    jn.add_argument("--head", required=True, help="the head's GCS address IP:PORT (its `up --host` and Ray port)")
    jn.add_argument("--node-ip", required=True, help="this host's address that the head can reach")
    jn.add_argument("--token-file", help="the head's <state dir>/ray-auth-token (or set $RAY_AUTH_TOKEN)")
    jn.add_argument("--num-cpus", type=int)
    jn.add_argument("--num-gpus", type=int)
    jn.add_argument("--temp-dir", help="Ray's session directory on this host")
    return parser


def _up(args: argparse.Namespace) -> int:
    ports = {n: getattr(args, n) for n in PORT_ENV}
    config = StackConfig.resolve(state_dir=args.state_dir, port_offset=args.port_offset, host=args.host, **ports)
    stack = Stack(config)
    result = stack.up(timeout=args.timeout, services=args.only.split(","), say=lambda m: print(m, flush=True))
    print(
        f"stack up in {result.seconds:.1f} s (started: {', '.join(result.started) or '-'}; "
        f"reused: {', '.join(result.reused) or '-'}); env in {stack.env_file}"
    )
    for name in result.started + result.reused:
        print(f"  {name:7s} {stack.config.urls[name]}")
    if "mlflow" in result.started + result.reused:
        print(f"  MLflow's login: user {result.env['MLFLOW_TRACKING_USERNAME']}, password in {stack.credentials_file}")
    return 0


def _status(stack: Stack, as_json: bool) -> int:
    report = stack.status()
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        for name, s in report.items():
            print(
                f"{name:7s} {s['state']:9s} {s['url']:24s} processes={len(s['pids']):<3d} "
                f"rss={s['rss_mib']:.0f} MiB pss={s['pss_mib']:.0f} MiB"
            )
    return 0 if all(s["state"] == "up" for s in report.values()) else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "up":
            return _up(args)
        if args.command == "join":
            cfg = JoinConfig(args.head, args.node_ip, args.num_cpus, args.num_gpus, args.temp_dir)
            join(cfg, read_token(args.token_file, os.environ))
            return 0
        stack = Stack.from_state_dir(args.state_dir)
        if args.command == "down":
            stopped = stack.down(services=args.only.split(","))
            print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
            return 0
        if args.command == "env":
            for key, value in load_env(stack.config.state_dir).items():
                print(f"export {key}={shlex.quote(value)}")
            return 0
        return _status(stack, args.json)
    except (StackError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
