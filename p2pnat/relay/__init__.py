"""p2pnat.relay"""
