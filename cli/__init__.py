"""mlserve: self-hosted serve mode for machine-learning apps."""

__version__ = "0.1.0"
