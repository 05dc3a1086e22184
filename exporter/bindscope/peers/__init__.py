"""Watching other hosts' exporters: fetch their declared services, connect to them from here."""
