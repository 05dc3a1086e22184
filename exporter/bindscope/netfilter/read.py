"""Reads a namespace's netfilter state: runs nft and iptables-save once per generation."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
from collections.abc import Callable

from bindscope.netfilter.iptables import parse_iptables_save
from bindscope.netfilter.nft import parse_nft_json
from bindscope.netfilter.ruleset import (
    Ruleset,
)

# --- reading ------------------------------------------------------------------------

Runner = Callable[..., subprocess.CompletedProcess]


def read_ruleset(
    netns_path: str | None = None,
    runner: Runner = subprocess.run,
    legacy: bool | None = None,
    timeout: float = 5.0,
) -> tuple[Ruleset | None, str]:
    """The packet filter of the current namespace, or of the one at netns_path.

    Returns (ruleset, "") or (None, error). Needs CAP_NET_ADMIN. `legacy`: whether to
    read legacy iptables too; None looks for legacy tables in /proc.
    """
    prefix = ["nsenter", f"--net={netns_path}", "--"] if netns_path else []

    def run(*cmd: str) -> str:
        try:
            r = runner([*prefix, *cmd], capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError as e:
            raise OSError(f"{cmd[0]}: not installed ({e.filename})") from e
        except subprocess.TimeoutExpired as e:
            raise OSError(f"{cmd[0]}: no answer in {timeout}s") from e
        if r.returncode != 0:
            msg = (r.stderr or "").strip().splitlines()
            raise OSError(f"{cmd[0]}: {msg[-1] if msg else f'exit status {r.returncode}'}")
        return r.stdout

    try:
        rs = parse_nft_json(run("nft", "-j", "list", "ruleset"))
        xt = rs.xt_tables
        if xt:
            # iptables-nft's own view shows the extensions' arguments nft hides.
            s4 = run("iptables-nft-save") if any(f == "ip" for f, _ in xt) else ""
            s6 = run("ip6tables-nft-save") if any(f == "ip6" for f, _ in xt) else ""
            rs = rs.replace_tables(parse_iptables_save(s4, s6, backend="iptables-nft"))
        if legacy is None:
            legacy = _legacy_tables_present(netns_path)
        if legacy:
            rs = rs.merge(
                parse_iptables_save(run("iptables-legacy-save"), run("ip6tables-legacy-save"))
            )
    except (OSError, ValueError) as e:
        return None, str(e)
    return rs, ""


def _legacy_tables_present(netns_path: str | None) -> bool:
    """Whether legacy iptables tables exist there; True when that cannot be told."""
    if netns_path is None:
        base = "/proc/net"
    elif netns_path.startswith("/proc/") and netns_path.endswith("/ns/net"):
        base = netns_path[: -len("/ns/net")] + "/net"
    else:
        return True
    for name in ("ip_tables_names", "ip6_tables_names"):
        try:
            with open(os.path.join(base, name)) as f:
                if f.read().strip():
                    return True
        except OSError:
            continue  # the legacy module is not loaded: no legacy tables anywhere
    return False


_NFNL_SUBSYS_NFTABLES = 10
_NFT_MSG_GETGEN = 16
_NFTA_GEN_ID = 1


def generation_id() -> int | None:
    """The nftables ruleset generation of the calling thread's network namespace.

    One netlink round trip (no subprocess): a scan can skip re-reading the ruleset
    while this is unchanged. None when it cannot be asked (no CAP_NET_ADMIN).
    Legacy iptables changes do not move it.
    """
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12) as s:  # NETLINK_NETFILTER
            s.settimeout(1.0)
            msg_type = (_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_GETGEN
            body = struct.pack("BBH", socket.AF_UNSPEC, 0, 0)
            s.send(struct.pack("=IHHII", 16 + len(body), msg_type, 1, 1, 0) + body)
            data = s.recv(65536)
    except OSError:
        return None
    length, mtype = struct.unpack_from("=IH", data)
    if mtype == 2:  # NLMSG_ERROR
        return None
    off = 16 + 4
    while off + 4 <= min(length, len(data)):
        alen, atype = struct.unpack_from("=HH", data, off)
        if atype & 0x7FFF == _NFTA_GEN_ID and alen >= 8:
            return struct.unpack_from(">I", data, off + 4)[0]
        off += (alen + 3) & ~3
    return None
