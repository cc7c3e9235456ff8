"""p2pnat.agent"""
