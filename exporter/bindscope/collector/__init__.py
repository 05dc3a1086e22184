"""Prometheus metric families: the scan's (rendered once per scan) and the runtime's."""
