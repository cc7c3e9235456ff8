"""
What the three twistd plugins share: configuration, options, services, logs, metrics.
"""
