"""Command lines: `bindscope-exporter` (the daemon) and `bindscope` (the operator's tool)."""
