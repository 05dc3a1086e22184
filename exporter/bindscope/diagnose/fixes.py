"""Commands and edits that fix what diagnose finds."""

from __future__ import annotations

from bindscope.model import Firewall
from bindscope.netfilter.ruleset import Decision


def opening_command(decision: Decision, protocol: str, port: int) -> str:
    """A command that lets other hosts in, for a DROP decision; "" otherwise."""
    if decision.verdict is not Firewall.DROP:
        return ""
    return _command(decision, protocol, port, allow=True)


def closing_command(decision: Decision, protocol: str, port: int) -> str:
    """A command that keeps other hosts out, for an ACCEPT decision; "" otherwise."""
    if decision.verdict is not Firewall.ACCEPT:
        return ""
    return _command(decision, protocol, port, allow=False)


def _command(d: Decision, protocol: str, port: int, allow: bool) -> str:
    if d.manager == "ufw":
        return f"ufw {'allow' if allow else 'deny'} {port}/{protocol}"
    if d.manager == "firewalld":
        zone = ""
        if d.chain.startswith("filter_IN_"):
            zone = " --zone=" + d.chain.removeprefix("filter_IN_").split("_")[0]
        verb = "add" if allow else "remove"
        return (
            f"firewall-cmd --permanent{zone} --{verb}-port={port}/{protocol}"
            " && firewall-cmd --reload"
        )
    target = "accept" if allow else "drop"
    # iptables-nft writes tables nft shows as plain `ip filter` with upper-case chains;
    # nft itself warns against editing those, so the fix goes through iptables
    written_by_iptables = d.family in ("ip", "ip6") and d.table == "filter" and d.chain.isupper()
    if d.backend.startswith("iptables") or not d.table or written_by_iptables:
        tool = "ip6tables" if d.family == "ip6" else "iptables"
        chain = d.chain if written_by_iptables else "INPUT"
        return f"{tool} -I {chain} -p {protocol} --dport {port} -j {target.upper()}"
    return f"nft insert rule {d.family} {d.table} {d.chain} {protocol} dport {port} {target}"
