"""
The base of every NAT-lab test: :func:`require_lab` (may this machine build
labs?), :class:`LabSetup` (a lab and a working directory) and
:class:`LabTestCase` (who builds the lab, when it goes, and what a failure
says).
"""

import atexit
import os
import shutil
import tempfile

from twisted.trial.unittest import SkipTest, SynchronousTestCase

#: The Debian package of each extra tool a lab test may need.
_PACKAGES = {"curl": "curl", "ss": "iproute2"}


def require_lab(*tools):
    """
    Skip (with the reason) unless this machine can build NAT labs (root,
    ``ip``, ``nft``, ``conntrack``) and has ``tools`` too; when the
    environment variable ``CI`` is set, fail instead: CI must really run
    the lab tests.
    """
    from p2pnat.lab import unavailable_reason

    reason = unavailable_reason(("ip", "nft", "conntrack"))
    if reason is None:
        missing = [tool for tool in tools if shutil.which(tool) is None]
        if missing:
            packages = " ".join(sorted({_PACKAGES.get(tool, tool) for tool in missing}))
            reason = f"needs {' and '.join(missing)} (apt-get install {packages})"
    if reason:
        message = f"NAT lab unavailable: {reason}"
        if os.environ.get("CI"):
            raise AssertionError(f"{message} (CI is set: the lab tests must run here)")
        raise SkipTest(message)


def measured(text):
    """Show a measurement in the test run's output."""
    print(f" [{text}]", end="", flush=True)


class LabSetup:
    """
    A NAT lab (:attr:`lab`, a :class:`p2pnat.lab.Lab`) and a working
    directory for what its tests write (state directories, bundles,
    downloads).  A subclass adds what all its labs have in :meth:`setup`;
    if that raises, the lab is closed before the error goes on.
    :meth:`close` closes the lab (its namespaces and processes); the
    working directory stays the caller's.
    """

    #: Keyword arguments of the :class:`p2pnat.lab.Lab` (``{"ipv6": True}``
    #: for a dual-stack one).
    lab_options = {}

    def __init__(self, workdir):
        from p2pnat.lab import Lab

        self.workdir = workdir
        self.lab = Lab(**self.lab_options)
        try:
            self.setup()
        except BaseException:
            self.lab.close()
            raise

    def setup(self):
        """Add the nodes and state every lab of this kind starts with."""

    def close(self):
        self.lab.close()

    def report(self):
        """The lab's topology and every process's output, for a failure message."""
        return self.lab.report()


class LabTestCase(SynchronousTestCase):
    """
    A test with a NAT lab: :attr:`env` is what :meth:`make_env` made (a
    :class:`LabSetup`), :attr:`lab` its :class:`p2pnat.lab.Lab`.

    By default the tests of a class share one lab: :meth:`make_env` and
    :meth:`build` run before the class's first test, and the lab is closed
    (after :meth:`finished`) when the class's last test is done, when
    another class builds its lab (so at most one shared lab is up, also
    when only some tests run) or at interpreter exit.  A build that fails
    closes what it built and fails each of the class's tests with its
    error.  With :attr:`lab_per_test` each test gets a lab of its own,
    closed in the test's cleanup.

    Every test skips, or fails with ``CI`` set, as :func:`require_lab`
    says (:attr:`tools`: the extra tools the class needs).  With
    :attr:`report_failures`, a failing test's message ends with the lab's
    report (topology, every process's output).
    """

    #: Tools the tests need besides the lab's own (``curl``, ``ss``).
    tools = ()
    #: A lab per test instead of one per class.
    lab_per_test = False
    #: Add the lab's report to a failure's message.
    report_failures = True

    @classmethod
    def make_env(cls, workdir):
        """The class's lab, working in ``workdir``."""
        return LabSetup(workdir)

    @classmethod
    def build(cls, env):
        """Add what the class's tests share to ``env`` (nothing here)."""

    @classmethod
    def finished(cls, env):
        """Called when ``env`` is done with, before it closes (nothing here)."""

    def setUp(self):
        require_lab(*self.tools)
        cls = type(self)
        if self.lab_per_test:
            self.env = _open(cls, f"{cls.__name__}-{self._testMethodName}")
            self.addCleanup(_close, cls, self.env)
        else:
            shared = _SharedLab.of(cls)
            self.env = shared.get()
            self.addCleanup(shared.done, self._testMethodName)
        self.lab = self.env.lab
        if self.report_failures:
            self._add_report_to_failures()

    def _add_report_to_failures(self):
        method = getattr(self, self._testMethodName)
        env = self.env

        def with_report():
            try:
                return method()
            except SkipTest:
                raise
            except self.failureException as e:
                raise self.failureException(f"{e}\n{env.report()}") from e
            except Exception as e:
                raise self.failureException(f"{type(e).__name__}: {e}\n{env.report()}") from e

        setattr(self, self._testMethodName, with_report)


def _open(cls, name):
    """``cls``'s lab, built; if building fails, nothing is left behind."""
    workdir = tempfile.mkdtemp(prefix=f"p2pnat-{name}-")
    env = None
    try:
        env = cls.make_env(workdir)
        cls.build(env)
    except BaseException as e:
        report = env.report() if env is not None else ""
        if env is not None:
            env.close()
        shutil.rmtree(workdir, ignore_errors=True)
        if not isinstance(e, Exception):  # ^C and the like go on as they are
            raise
        raise AssertionError(f"building the lab failed: {e!r}\n{report}") from e
    return env


def _close(cls, env):
    try:
        cls.finished(env)
    finally:
        env.close()
        shutil.rmtree(env.workdir, ignore_errors=True)


class _SharedLab:
    """The lab one class's tests share, and which of them have not run yet."""

    _by_class = {}
    #: The one shared lab up now.
    current = None

    def __init__(self, cls):
        self.cls = cls
        self.env = None
        self.error = None
        self.pending = set()

    @classmethod
    def of(cls, test_class):
        if test_class not in cls._by_class:
            cls._by_class[test_class] = cls(test_class)
        return cls._by_class[test_class]

    def get(self):
        if self.error is not None:
            raise self.error
        if self.env is None:
            if _SharedLab.current is not None:
                _SharedLab.current.close()
            try:
                self.env = _open(self.cls, self.cls.__name__)
            except AssertionError as e:
                self.error = e
                raise
            self.pending = {name for name in dir(self.cls) if name.startswith("test")}
            _SharedLab.current = self
        return self.env

    def done(self, name):
        self.pending.discard(name)
        if not self.pending:
            self.close()

    def close(self):
        if _SharedLab.current is self:
            _SharedLab.current = None
        if self.env is not None:
            env, self.env = self.env, None
            _close(self.cls, env)

    @classmethod
    def close_current(cls):
        if cls.current is not None:
            cls.current.close()


atexit.register(_SharedLab.close_current)
