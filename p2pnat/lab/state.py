# -*- test-case-name: tests.unit.test_lab_rules,tests.lab.test_lab -*-
"""
Names and state files of NAT labs, and the reaping of labs whose owner died.

Every namespace a lab creates is named ``p2l<LABID>-<node>``:

- a lab of a running program (a test) has ``LABID = <pid>x<n>``, the owner's
  pid and a counter, so that two labs never share a name and a lab left by a
  killed run can be recognised from its name alone;
- a named, long-lived lab (``p2pnat lab up --name demo``) has
  ``LABID = -demo``, giving ``p2l-demo-a``.

Besides, each lab keeps a state file ``<state_dir>/<LABID>.json`` listing its
namespaces (written *before* each namespace is created) and its owner's pid
and process start time, so that pid reuse cannot keep a dead lab alive.
Reaping only ever touches namespaces of this family whose owner is dead.
"""

import json
import os
import re

from p2pnat.lab.errors import LabConfigError

STATE_DIR = "/run/p2pnat-lab"
NS_PREFIX = "p2l"

_NODE_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
_LAB_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
_EPHEMERAL_NS_RE = re.compile(rf"^{NS_PREFIX}(\d+)x(\d+)-")


def check_node_name(name):
    """
    Check a node (host, router, server) name: 1-12 of ``[a-z0-9]``, starting
    with a letter.  Short, so namespace names stay easy to type.
    """
    if not _NODE_RE.match(name or ""):
        raise LabConfigError(f"bad node name {name!r}: use 1-12 of a-z0-9, starting with a letter")
    return name


def check_lab_name(name):
    """Check a named lab's name (same rule as node names)."""
    if not _LAB_NAME_RE.match(name or ""):
        raise LabConfigError(f"bad lab name {name!r}: use 1-12 of a-z0-9, starting with a letter")
    return name


def ephemeral_lab_id(pid, counter):
    """The id of the ``counter``-th lab of process ``pid``."""
    return f"{pid}x{counter}"


def named_lab_id(name):
    """The id of the long-lived lab called ``name``."""
    return "-" + check_lab_name(name)


def ns_name(lab_id, node):
    """The namespace name of ``node`` in lab ``lab_id``."""
    return f"{NS_PREFIX}{lab_id}-{node}"


def ns_owner_pid(ns):
    """
    The owner pid encoded in an ephemeral lab's namespace name, or ``None``
    for any other name (named labs and namespaces that are not ours).
    """
    m = _EPHEMERAL_NS_RE.match(ns)
    return int(m.group(1)) if m else None


def process_start_time(pid):
    """
    The start time of process ``pid`` (clock ticks since boot, field 22 of
    ``/proc/PID/stat``), or ``None`` if there is no such process.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after it.
    return int(stat.rpartition(")")[2].split()[19])


def owner_alive(pid, start_time=None):
    """
    Whether the process ``pid`` still runs, and is the same process as the
    one that started at ``start_time`` when that is known.
    """
    now = process_start_time(pid)
    if now is None:
        return False
    return start_time is None or now == start_time


def stale_namespaces(namespaces, states, alive=owner_alive):
    """
    Choose what to reap.  ``namespaces`` are the names ``ip netns list``
    shows; ``states`` the loaded state files (dicts).  Return the names of the
    namespaces to delete and the ids of the state files to remove.

    Only namespaces of our family are chosen: those listed by a state file
    whose owner is dead (and that are not persistent), and ephemeral ones
    whose name's pid is dead and that no live lab's state file claims.
    """
    existing = set(namespaces)
    doomed, dead_states, claimed = [], [], set()
    for state in states:
        lab_id = state.get("lab_id", "")
        prefix = ns_name(lab_id, "")
        mine = [ns for ns in state.get("namespaces", []) if ns.startswith(prefix)]
        if state.get("persistent") or alive(state.get("pid", -1), state.get("pid_start")):
            claimed.update(mine)
            continue
        dead_states.append(lab_id)
        claimed.update(mine)
        doomed.extend(ns for ns in mine if ns in existing)
    for ns in namespaces:
        pid = ns_owner_pid(ns)
        if ns in claimed or pid is None:
            continue
        if not alive(pid):
            doomed.append(ns)
    return doomed, dead_states


def state_path(state_dir, lab_id):
    """The path of lab ``lab_id``'s state file."""
    return os.path.join(state_dir, f"{lab_id}.json")


def write_state(state_dir, state):
    """Write a lab's state file atomically (a reader never sees half of it)."""
    os.makedirs(state_dir, mode=0o755, exist_ok=True)
    path = state_path(state_dir, state["lab_id"])
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_state(state_dir, lab_id):
    """Read lab ``lab_id``'s state file; ``None`` if there is none."""
    try:
        with open(state_path(state_dir, lab_id)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def remove_state(state_dir, lab_id):
    """Remove lab ``lab_id``'s state file if it exists."""
    try:
        os.unlink(state_path(state_dir, lab_id))
    except FileNotFoundError:
        pass


def load_states(state_dir):
    """Every readable state file in ``state_dir`` (a missing dir is empty)."""
    try:
        names = sorted(os.listdir(state_dir))
    except FileNotFoundError:
        return []
    states = []
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(state_dir, name)) as f:
                state = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(state, dict) and state.get("lab_id") == name[: -len(".json")]:
            states.append(state)
    return states
