"""psr: Process-based Self-Rewarding."""
__version__ = "0.1.0"
