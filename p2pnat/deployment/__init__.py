"""
A deployment's state as library calls: its registry, its CA and keys, provisioning.
"""
