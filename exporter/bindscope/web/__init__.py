"""HTTP: the server, the landing page, and the TLS and basic auth web config."""
