"""`studio ui`: the web UI. Served beyond this machine only with a password (--auth USER:PASS), or when the
user says explicitly that anyone who can reach the port may use it (--insecure-no-auth)."""

from __future__ import annotations

import ipaddress

from studio.loading import StudioError


def register(sub) -> None:
    u = sub.add_parser("ui", help="the web UI")
    u.add_argument("--host", default="127.0.0.1", help="the address to serve on (default: this machine only)")
    u.add_argument("--port", type=int, default=7860)
    u.add_argument("--auth", default=None, metavar="USER:PASS", help="the login the page asks for")
    u.add_argument("--insecure-no-auth", action="store_true",
                   help="serve a non-local --host without a login: anyone who reaches the port can train and "
                        "write files here")
    u.add_argument("--model", default="shapes")
    u.add_argument("--workspace", default=None, help="where uploads, runs and the adapter library live "
                                                     "(default: ./studio-workspace or $STUDIO_WORKSPACE)")
    u.set_defaults(func=run)


def is_loopback(host: str) -> bool:
    """True for this machine only: localhost, 127.0.0.0/8, ::1."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def check_exposure(host: str, auth: str | None, insecure: bool) -> None:
    if auth is not None and (":" not in auth or not auth.split(":", 1)[0] or not auth.split(":", 1)[1]):
        raise StudioError("--auth takes USER:PASS, both non-empty")
    if not is_loopback(host) and auth is None and not insecure:
        raise StudioError(f"--host {host} serves the studio to the network: give --auth USER:PASS (or "
                          "--insecure-no-auth to serve it without a login)")


def run(args) -> None:
    check_exposure(args.host, args.auth, args.insecure_no_auth)
    from studio.ui.app import launch  # lazily: the UI sits above the core

    launch(host=args.host, port=args.port, auth=args.auth, model=args.model, workspace=args.workspace)
