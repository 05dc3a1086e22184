"""Reads a namespace's netfilter state once: nft's JSON (and iptables-save where nft's
JSON cannot show everything), handed to both consumers, the firewall evaluator's Ruleset
and the NAT map of published ports. Needs CAP_NET_ADMIN; every failure is a message."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from bindscope.model import PublishedPort
from bindscope.netfilter.iptables import parse_iptables_save
from bindscope.netfilter.nat import dedupe, docker_proxy_ports, nat_from_nft, parse_iptables_nat
from bindscope.netfilter.nft import ingress_devices, ruleset_from_nft, with_ingress_devices
from bindscope.netfilter.ruleset import Ruleset

Runner = Callable[..., subprocess.CompletedProcess]
TIMEOUT = 5.0


@dataclass(frozen=True)
class Netfilter:
    """One read of a namespace's packet filter, for both of its consumers."""

    ruleset: Ruleset | None  # None: could not be read (`error` says why)
    error: str
    nat: tuple[PublishedPort, ...] = ()
    nat_errors: tuple[str, ...] = ()


class _Commands:
    """Runs netfilter tools in the namespace, with one convention for failures."""

    def __init__(self, netns_path: str | None, runner: Runner, timeout: float) -> None:
        self._prefix = ["nsenter", f"--net={netns_path}", "--"] if netns_path else []
        self._runner = runner
        self._timeout = timeout

    def run(self, *cmd: str) -> tuple[str | None, str | None]:
        """(stdout, None); (None, message) on failure; (None, None) when not installed."""
        what = " ".join(cmd)
        try:
            done = self._runner(
                [*self._prefix, *cmd], capture_output=True, text=True, timeout=self._timeout
            )
        except FileNotFoundError:
            return None, None
        except subprocess.TimeoutExpired:
            return None, f"{what}: no answer in {self._timeout}s"
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"{what}: {e}"
        if done.returncode != 0:
            detail = (done.stderr or "").strip().splitlines()
            return None, f"{what}: exit {done.returncode}: {detail[-1] if detail else ''}"
        return done.stdout, None

    def need(self, *cmd: str) -> str:
        out, err = self.run(*cmd)
        if out is None:
            raise OSError(err or f"{cmd[0]}: not installed")
        return out


def read_netfilter(
    netns_path: str | None = None,
    runner: Runner = subprocess.run,
    legacy: bool | None = None,
    nat: bool = True,
    proc: str = "/proc",
    timeout: float = TIMEOUT,
) -> Netfilter:
    """The netfilter state of the current namespace, or of the one at netns_path.

    Each tool runs at most once and its output feeds both consumers: nft's JSON; the
    iptables-nft view where nft's JSON shows iptables extensions without their arguments;
    legacy iptables where its tables exist (`legacy`: None looks in /proc); iptables-save
    for the NAT map where nft is missing or fails. `nat`: whether the NAT map is wanted
    (the host's published ports, docker-proxy's included).
    """
    cmds = _Commands(netns_path, runner, timeout)
    text, err = cmds.run("nft", "-j", "list", "ruleset")
    nat_errors: list[str] = []
    ports: list[PublishedPort] = []
    ruleset: Ruleset | None = None
    error = err or "nft: not installed"
    doc = None
    if text is not None:
        try:
            doc = json.loads(text)["nftables"]
            ruleset = ruleset_from_nft(doc)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            doc, error = None, f"nft -j list ruleset: not nft JSON output: {e!r}"
    if legacy is None:
        legacy = _legacy_tables(netns_path, proc)
    try:
        if ruleset is not None and any(
            c.hook == "ingress" and not c.devices for c in ruleset.chains
        ):
            ruleset = with_ingress_devices(
                ruleset, ingress_devices(cmds.need("nft", "list", "chains"))
            )
        if doc is not None and ruleset is not None:
            found, opaque = nat_from_nft(doc)
            ports += found
            opaque = opaque and nat
            families = {family for family, _ in ruleset.xt_tables}
            if families or opaque:
                # iptables-nft's own view shows the extensions' arguments nft hides
                s4 = cmds.need("iptables-nft-save") if opaque or "ip" in families else ""
                s6 = cmds.need("ip6tables-nft-save") if opaque or "ip6" in families else ""
                if families:
                    ruleset = ruleset.replace_tables(
                        parse_iptables_save(s4, s6, backend="iptables-nft")
                    )
                if opaque:
                    ports += parse_iptables_nat(s4) + parse_iptables_nat(s6)
        elif nat:
            if err is not None or text is not None:
                nat_errors.append(error)
            ports += _nat_from_iptables(cmds, nat_errors, nft_missing=text is None and not err)
        if legacy:
            s4, e4 = cmds.run("iptables-legacy-save")
            s6, e6 = cmds.run("ip6tables-legacy-save")
            if e4 or e6:
                raise OSError(e4 or e6)
            # without the legacy tools nothing can have written legacy tables: the nft
            # ruleset already read is the whole filter
            if ruleset is not None and (s4 or s6):
                ruleset = ruleset.merge(parse_iptables_save(s4 or "", s6 or ""))
            if nat and doc is not None:
                ports += parse_iptables_nat(s4 or "") + parse_iptables_nat(s6 or "")
    except (OSError, ValueError) as e:
        ruleset, error = None, str(e)
        nat_errors.append(str(e))
    if netns_path is None and nat:
        ports += docker_proxy_ports(proc)
    return Netfilter(
        ruleset, "" if ruleset is not None else error, tuple(dedupe(ports)), tuple(nat_errors)
    )


def _nat_from_iptables(cmds: _Commands, errors: list[str], nft_missing: bool) -> list:
    """Without nft's JSON, the NAT map from iptables-save, whichever backend it uses."""
    ports: list[PublishedPort] = []
    read_any = False
    for tool in ("iptables-save", "ip6tables-save"):
        out, err = cmds.run(tool, "-t", "nat")
        if out is not None:
            read_any = True
            try:
                ports += parse_iptables_nat(out)
            except ValueError as e:  # shlex: an unbalanced quote
                errors.append(f"{tool} -t nat: unreadable output: {e}")
        elif err is not None:
            errors.append(err)
    if nft_missing and not read_any:
        errors.append("neither nft nor iptables-save could be run: NAT rules not read")
    return ports


def read_ruleset(
    netns_path: str | None = None,
    runner: Runner = subprocess.run,
    legacy: bool | None = None,
    timeout: float = TIMEOUT,
) -> tuple[Ruleset | None, str]:
    """The packet filter alone: (ruleset, "") or (None, error)."""
    state = read_netfilter(netns_path, runner, legacy, nat=False, timeout=timeout)
    return state.ruleset, state.error


def _legacy_tables(netns_path: str | None, proc: str) -> bool:
    """Whether legacy iptables tables exist there; True when that cannot be told (a
    namespace opened by a path under /run/netns)."""
    if netns_path is None:
        base = f"{proc}/net"
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


def open_netfilter_socket() -> socket.socket:
    """A NETLINK_NETFILTER socket for generation_id(); it stays in the namespace of the
    thread that opened it."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
    s.settimeout(1.0)
    return s


def generation_id(sock: socket.socket | None = None) -> int | None:
    """The nftables ruleset generation of the calling thread's network namespace, or of
    the namespace sock was opened in.

    One netlink round trip (no subprocess): a scan can skip re-reading the ruleset
    while this is unchanged. None when it cannot be asked (no CAP_NET_ADMIN).
    Legacy iptables changes do not move it. Raises OSError only when a given socket
    failed (it may hold a late reply: not to be used again).
    """
    msg_type = (_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_GETGEN
    body = struct.pack("BBH", socket.AF_UNSPEC, 0, 0)
    request = struct.pack("=IHHII", 16 + len(body), msg_type, 1, 1, 0) + body
    if sock is not None:
        sock.send(request)
        data = sock.recv(65536)
    else:
        try:
            with open_netfilter_socket() as s:
                s.send(request)
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
