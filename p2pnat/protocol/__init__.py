"""
Wire formats and planning: pure logic, no Twisted, no sockets, no clock.
"""
