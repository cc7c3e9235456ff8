# -*- test-case-name: tests.unit.test_provision -*-
"""
The ``p2pnat`` command: everything that is not a daemon.

Each command group lives in its own module and registers itself through an
``add_parser(subparsers)`` function that sets ``func`` on its parser.  A
command returns its exit status; a :class:`CommandError` is printed as one
line on standard error with exit status 2, never as a traceback.
"""

import argparse
import sys

# Command groups, by module; each module has add_parser(subparsers).
_GROUPS = [
    "p2pnat.cli.demo",
    "p2pnat.cli.lab",
    "p2pnat.cli.provision",
    "p2pnat.cli.forward",
    "p2pnat.cli.peer",
    "p2pnat.cli.netcheck",
    "p2pnat.cli.cluster",
]


class CommandError(Exception):
    """
    A user-facing failure: printed as one line, exit status 2.
    """


def build_parser():
    import importlib

    parser = argparse.ArgumentParser(
        prog="p2pnat",
        description="Reach machines behind NAT: provisioning, diagnosis and the NAT lab.",
    )
    from p2pnat import __version__

    parser.add_argument("--version", action="version", version=f"p2pnat {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _GROUPS:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        status = args.func(args)
    except CommandError as e:
        print(f"p2pnat {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0 if status is None else status

