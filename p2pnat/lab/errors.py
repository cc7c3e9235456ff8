# -*- test-case-name: tests.unit.test_lab_rules,tests.lab.test_lab -*-
"""
The NAT lab's exceptions.
"""


class LabError(Exception):
    """
    Something the lab could not do; the message is one line, fit for a user.
    """


class LabUnavailable(LabError):
    """
    This machine cannot run a lab: not root, or a needed tool or kernel
    feature is missing.  Tests skip on it; the CLI reports it.
    """


class LabConfigError(LabError, ValueError):
    """
    A topology request that makes no sense: a bad name, kind, port plan...
    """
