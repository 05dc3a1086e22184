"""bindscope: compares what listens on a host with what should, and exports the verdicts."""

__version__ = "0.1.0"
