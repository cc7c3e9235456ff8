# -*- test-case-name: tests.test_demo -*-
"""
``p2pnat demo``: a relay, a device agent and a sample device web site in
one process on one machine, so that a newcomer sees the relay path work in
a browser before deploying anything.

- L{p2pnat.demo.site}: the sample device web UI (page, stylesheet, script,
  image, form, cookie), the way an appliance serves it on its LAN.
- L{p2pnat.demo.cli}: the command, which provisions a state directory and
  runs the three parts in one reactor, all through the real UDP notify,
  connect-request and TLS tunnel path.
"""
