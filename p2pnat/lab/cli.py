"""
``p2pnat lab``: placeholder registration, replaced by the lab implementation.
"""


def add_parser(subparsers):
    p = subparsers.add_parser("lab", help="build and tear down NAT lab topologies (root)")
    p.set_defaults(func=lambda args: 0)
