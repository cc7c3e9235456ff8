"""p2pnat.lobby"""
