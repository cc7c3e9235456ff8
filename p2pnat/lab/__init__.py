"""p2pnat.lab"""
