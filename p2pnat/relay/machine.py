# -*- test-case-name: tests.unit.test_relay_machines -*-
"""
A thin layer over Automat's L{TypeMachineBuilder} for the relay's protocol
state machines (L{p2pnat.relay.terminal_machine},
L{p2pnat.relay.tunnel_machine}).

It adds two things the protocols need:

- every input is handled in every state: the pairs a machine does not
  declare go to one C{unexpected} output (log and ignore), so a peer or a
  race can never crash a connection with L{automat.NoTransition};
- a ``state() -> str`` input answering the current state's name (for tests
  and log lines; the protocols never compare it).

Automat finds an input's transition by scanning the machine's transitions
(about 9 µs an input for these machines).  That is paid per control event
of a connection (its head, its tunnel, its end), a few tens of µs per
connection, never per byte: the stream's data goes by direct calls.  An
index over Automat's private automaton would save most of it, at the price
of breaking on an Automat release; it is not worth it.
"""

from automat import TypeMachineBuilder


class MachineBuilder:
    """
    Declares a machine: states, then C{on(state, input, to)} transitions,
    then L{build}.

    @param inputs: the input protocol (a L{typing.Protocol} whose methods
        are annotated ``-> None``, so that Automat queues an input given
        while an output runs instead of refusing it), with a ``state``
        method annotated ``-> str``.
    @param core: the core type handed to every output.
    """

    def __init__(self, inputs, core):
        self.inputs = inputs
        self._builder = TypeMachineBuilder(inputs, core)
        self._states = []
        self._handled = set()
        self._inputs = [getattr(inputs, name) for name in sorted(vars(inputs))
                        if callable(getattr(inputs, name)) and not name.startswith("_")
                        and name != "state"]

    def state(self, name):
        s = self._builder.state(name)
        self._states.append(s)
        return s

    def on(self, states, input, to=None):
        """
        Decorator: C{impl(machine, core, *args)} handles C{input} in each of
        C{states} (one state or a list) and moves to C{to} (None: stays).
        """
        states = states if isinstance(states, (list, tuple)) else [states]

        def register(impl):
            for s in states:
                self._handled.add((s.name, input.__name__))
                upon = s.upon(input)
                (upon.loop() if to is None or to is s else upon.to(to))(impl)
            return impl

        return register

    def ignore(self, states, *inputs):
        """C{inputs} are expected in C{states} and do nothing there."""
        for input in inputs:
            self.on(states, input)(_ignored)

    def build(self, unexpected):
        """
        The machine factory (called with a core).

        @param unexpected: C{unexpected(core, state_name, input_name)}, run for
            any input in a state that did not declare it; the state does not
            change.
        """
        for s in self._states:
            s.upon(self.inputs.state).loop().returns(s.name)
            for input in self._inputs:
                if (s.name, input.__name__) not in self._handled:
                    s.upon(input).loop()(_unexpected_output(unexpected, s.name, input.__name__))
        return self._builder.build()


def _ignored(machine, core, *args, **kwargs):
    pass


def _unexpected_output(unexpected, state, input):
    def output(machine, core, *args, **kwargs):
        unexpected(core, state, input)

    output.__name__ = f"unexpected_{input}_in_{state}"
    return output


class MachineProtocol:
    """
    What the relay's two protocols driven by these machines share
    (L{p2pnat.relay.terminal.Terminal}, L{p2pnat.relay.tunnel.RelayTunnel}):
    their state and device as the machine's core knows them, and the end of
    the connection (its place in the connection limits given back, then
    the machine told).
    """

    slot = None  # the connection's place in the ConnectionLimits, if counted
    machine = None
    core = None

    @property
    def state(self):
        """The machine's state name (for tests and diagnostics)."""
        return self.machine.state()

    @property
    def device_id(self):
        return self.core.device_id

    def machine_lost(self):
        """The connection is gone: give back its slot, then tell the machine."""
        if self.slot is not None:
            self.slot.release()
        self.machine.connection_lost()
