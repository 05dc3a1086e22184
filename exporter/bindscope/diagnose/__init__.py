"""The classic troubleshooting of one port, as data: steps, findings and fixes."""
