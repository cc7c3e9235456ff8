"""
The relay's admin page: a read-only view of one relay node (and, in a
cluster, of every node) over HTTPS, with revoking a device as its one
action.  Off unless ``admin.listen`` is set.

- L{p2pnat.relay.admin.view}: what the page shows, as plain data, and its
  HTML (pure: escaping, no I/O);
- L{p2pnat.relay.admin.auth}: the admin's sign-in sessions, CSRF tokens
  and the Origin check (pure, on an injected clock);
- L{p2pnat.relay.admin.web}: the twisted.web resources that read the
  relay's state and serve the pages.

``docs/cluster.rst`` ("Operating a cluster") says how to turn it on and
what protects it.
"""
