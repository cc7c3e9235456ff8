"""
What the NAT-lab tests (``tests/lab``) share, one module per concern, each
piece once:

- :mod:`~tests.support.lab.cases`: :func:`~tests.support.lab.cases.require_lab`
  and :class:`~tests.support.lab.cases.LabTestCase`, the base of every lab
  test (a lab per class, or per test, torn down also on failure; a failing
  test's message carries the lab's report);
- :mod:`~tests.support.lab.running`: waiting on a lab process's output
  and its ``--json`` events, and running Python modules (our tools among
  them) inside a namespace;
- :mod:`~tests.support.lab.packets`: raw IPv4/UDP packets: build, mend
  checksums, send as they are, read p2pnat frame headers;
- :mod:`~tests.support.lab.tools`: the tools run inside namespaces with
  ``python -m tests.support.lab TOOL ...`` (sniff, forge, inject,
  tls-probe, echo, ping);
- :mod:`~tests.support.lab.relay`: :class:`~tests.support.lab.relay.RelayLab`,
  the relay path's lab (relay, devices, curl terminals);
- :mod:`~tests.support.lab.p2p`: :class:`~tests.support.lab.p2p.P2PLab`,
  the P2P path's lab (lobby, clients, trials, the matrix's summaries);
- :mod:`~tests.support.lab.homes`: a P2P lab's client behind a router of
  its own (:func:`~tests.support.lab.homes.add_home`), and UDP blocked
  between routers (:class:`~tests.support.lab.homes.UdpBlock`).

This file imports nothing, so that ``python -m tests.support.lab`` starts
fast inside a namespace (a sniffer must be listening before the traffic it
waits for).
"""
