"""``python -m dask_rs worker ADDRESS ...`` and ``python -m dask_rs scheduler ...``."""

from __future__ import annotations

import argparse
import signal
import sys


def scheduler_main(argv) -> int:
    from . import _core

    p = argparse.ArgumentParser(prog="python -m dask_rs scheduler", description="Run a dask-rs scheduler.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8786)
    p.add_argument("--dashboard-address", default=":8787",
                   help="where the dashboard listens, HOST:PORT or :PORT (default :8787)")
    p.add_argument("--no-dashboard", action="store_true", help="serve no dashboard")
    p.add_argument("--tls-ca-file", default=None, help="the cluster's CA certificate (PEM)")
    p.add_argument("--tls-cert", default=None, help="the scheduler's certificate (PEM)")
    p.add_argument("--tls-key", default=None,
                   help="the scheduler's private key (PEM; default: the certificate file)")
    args = p.parse_args(argv)
    if bool(args.tls_ca_file) != bool(args.tls_cert):
        p.error("--tls-ca-file and --tls-cert go together")
    dashboard = None if args.no_dashboard else args.dashboard_address
    tls = (args.tls_ca_file, args.tls_cert, args.tls_key or args.tls_cert) if args.tls_ca_file else None
    try:
        handle = _core.start_scheduler(args.host, args.port, dashboard_address=dashboard, tls=tls)
    except (OSError, ValueError) as e:
        print(f"dask_rs scheduler: error: {e}", file=sys.stderr)
        return 1
    print(f"Scheduler at {handle.address}", flush=True)
    if handle.dashboard_warning:
        print(f"warning: {handle.dashboard_warning}", file=sys.stderr)
    if handle.dashboard_link:
        print(f"Dashboard at {handle.dashboard_link}", flush=True)
    signal.signal(signal.SIGTERM, lambda *a: handle.stop())
    signal.signal(signal.SIGINT, lambda *a: handle.stop())
    while not handle.wait(0.2):
        pass
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    usage = "usage: python -m dask_rs {worker,scheduler} ..."
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "worker":
        from ._worker import main as worker_main

        return worker_main(rest)
    if cmd == "scheduler":
        return scheduler_main(rest)
    print(f"{usage}\nerror: unknown command {cmd!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
