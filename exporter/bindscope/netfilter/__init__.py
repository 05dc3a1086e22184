"""A namespace's netfilter state: read once per generation, parsed into one Ruleset (nft
JSON or iptables-save), evaluated for firewall verdicts, and mapped for published ports."""
