"""`bindscope diagnose HOST:PORT`: a connect from here, joined with HOST's own diagnosis.

What only the outside sees (the path: security groups, router ACLs, filters the host
cannot read) is told apart from what only the host sees (binds, processes, its firewall)
by putting the two side by side: refused here and loopback_only there is the app's bind;
timed out here while the host judges the port ok and its firewall accepts is the path.
"""

from __future__ import annotations

import enum
import errno
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from bindscope.config.load import BasicAuth, TLSConfig
from bindscope.model import PeerError
from bindscope.peers.fetch import Client, FetchError, Request, client_for

DOCUMENT_VERSION = 1
DEFAULT_EXPORTER_PORT = 9917
MAX_ADDRESSES = 8  # of a name that resolves to many: a diagnosis, not a sweep
_RESET_WAIT = 0.3  # after a connect, how long to wait for a reset from the far end


class Outcome(enum.Enum):
    OK = "ok"
    REFUSED = "refused"
    TIMED_OUT = "timed out"
    NO_ROUTE = "no route"
    RESET = "reset"
    ERROR = "error"


_ERRNO_OUTCOME = {
    errno.ECONNREFUSED: Outcome.REFUSED,
    errno.ETIMEDOUT: Outcome.TIMED_OUT,
    errno.EHOSTUNREACH: Outcome.NO_ROUTE,
    errno.ENETUNREACH: Outcome.NO_ROUTE,
    errno.ECONNRESET: Outcome.RESET,
}


@dataclass(frozen=True)
class Attempt:
    address: str
    outcome: Outcome
    detail: str  # errno name, or "" when ok
    duration: float
    source: str = ""  # this host's address toward it, as the kernel picks it


@dataclass(frozen=True)
class ExporterAccess:
    url: str
    username: str | None = None
    password_file: str | None = None
    ca_file: str | None = None


def connect_from_here(host: str, port: int, timeout: float) -> list[Attempt]:
    """One TCP connect to each address of host (at most MAX_ADDRESSES); nothing is sent."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return [Attempt(host, Outcome.ERROR, f"cannot resolve: {e.strerror}", 0.0)]
    seen = list(dict.fromkeys((i[0], i[4]) for i in infos))[:MAX_ADDRESSES]
    return [_connect(family, sockaddr, timeout) for family, sockaddr in seen]


def _connect(family: int, sockaddr: tuple, timeout: float) -> Attempt:
    address = sockaddr[0]
    source = _source_address(family, sockaddr)
    t0 = time.monotonic()
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(sockaddr)
        except TimeoutError:
            return Attempt(address, Outcome.TIMED_OUT, "timeout", time.monotonic() - t0, source)
        except OSError as e:
            outcome = _ERRNO_OUTCOME.get(e.errno or 0, Outcome.ERROR)
            name = errno.errorcode.get(e.errno or 0, str(e))
            return Attempt(address, outcome, name, time.monotonic() - t0, source)
        took = time.monotonic() - t0
        # a proxy in front of a dead backend accepts and then resets: wait a moment
        s.settimeout(min(_RESET_WAIT, timeout))
        try:
            s.recv(1)
        except ConnectionResetError:
            return Attempt(address, Outcome.RESET, "ECONNRESET", took, source)
        except OSError:
            pass  # silence (the service waits for the client to speak) is a success
    return Attempt(address, Outcome.OK, "", took, source)


def _source_address(family: int, sockaddr: tuple) -> str:
    """The address this host would send from (a UDP connect picks the route, sends nothing)."""
    with socket.socket(family, socket.SOCK_DGRAM) as u:
        try:
            u.connect(sockaddr)
            return str(u.getsockname()[0])
        except OSError:
            return ""


def default_exporter_url(host: str) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{DEFAULT_EXPORTER_PORT}"


def ask_exporter(access: ExporterAccess, port: int, timeout: float) -> dict[str, Any]:
    """HOST's exporter's diagnosis document of the port; FetchError says why there is none."""
    url = urllib.parse.urlsplit(access.url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise FetchError(PeerError.INVALID, f"--exporter {access.url!r} is not an http(s) URL")
    auth = None
    if access.username is not None:
        if access.password_file is None:
            raise FetchError(PeerError.CREDENTIALS, "--exporter.username needs a password file")
        auth = BasicAuth(access.username, access.password_file)
    client: Client = client_for(url.scheme, timeout, TLSConfig(ca_file=access.ca_file), auth)
    path = url.path.rstrip("/") + "/api/v1/diagnose?" + urllib.parse.urlencode({"target": port})
    default_port = 443 if url.scheme == "https" else 80
    req = Request(url.hostname, url.port or default_port, path, client)
    # bounded as a whole, however slowly the exporter answers
    timer = threading.Timer(3 * timeout, req.abort)
    timer.start()
    try:
        doc = req.run()
    finally:
        timer.cancel()
    if not isinstance(doc, dict) or doc.get("version") != DOCUMENT_VERSION:
        raise FetchError(PeerError.INVALID, "the answer is not a version 1 diagnosis document")
    return doc


# --- the join ---


@dataclass(frozen=True)
class HostView:
    """What HOST's exporter says of the port, when it answered."""

    status: str | None  # of the TCP service on the port; None: not in the answer
    firewall: str | None  # accept | drop | unknown; None: nothing beyond loopback
    result: str  # ok | problem
    fixes: tuple[dict[str, Any], ...]


def host_view(doc: dict[str, Any]) -> HostView:
    services = [s for s in doc.get("services") or [] if isinstance(s, dict)]
    tcp = [s for s in services if s.get("protocol") == "tcp"] or services
    first = tcp[0] if tcp else {}
    fixes = tuple(f for f in doc.get("fixes") or [] if isinstance(f, dict) and "summary" in f)
    status, firewall = first.get("status"), first.get("firewall")
    return HostView(
        status if isinstance(status, str) else None,
        firewall if isinstance(firewall, str) else None,
        "problem" if doc.get("result") == "problem" else "ok",
        fixes,
    )


@dataclass(frozen=True)
class Verdict:
    title: str
    lines: tuple[str, ...]
    problem: bool
    fixes: tuple[dict[str, Any], ...] = ()


_LISTENING_WIDE = {"ok", "wrong_process", "process_unknown", "overexposed"}


def join(host: str, port: int, attempts: list[Attempt], view: HostView | None) -> Verdict:
    """One verdict from the connect here and, when it answered, the host's own view."""
    ok = [a for a in attempts if a.outcome is Outcome.OK]
    here = ok[0] if ok else attempts[0]
    where = f"{_bracket(here.address)}:{port}"
    src = f" from {here.source}" if here.source else ""
    if view is None:
        return _connect_alone(host, port, here, where)
    status, fw = view.status or "unknown", view.firewall
    if here.outcome is Outcome.OK:
        if view.result == "problem":
            return Verdict(
                f"Reachable from here, but {host} reports a problem ({status})",
                (f"{where} accepts connections{src}.", f"{host} judges the port {status}."),
                True,
                view.fixes,
            )
        return Verdict(
            "Reachable from here, and the host judges it ok",
            (f"{where} accepts connections{src}, and {host} judges the port {status}.",),
            False,
        )
    if here.outcome is Outcome.REFUSED and status == "loopback_only":
        return Verdict(
            f"Refused here because on {host} it listens on loopback only",
            (
                f"{where} refuses the connection{src}: {host} says the service listens on "
                "127.0.0.1/::1 only, so every other host is refused. This is the classic "
                "development-server default (Flask's app.run(), Django's runserver).",
                "Bind it to every interface (or the host's address) and restart it.",
            ),
            True,
            view.fixes or (_fix("code", "bind to 0.0.0.0: app.run(host='0.0.0.0')"),),
        )
    if here.outcome is Outcome.REFUSED and status == "not_listening":
        return Verdict(
            f"Refused here because nothing listens on port {port} on {host}",
            (f"{where} refuses the connection{src}; {host} finds no listener on the port.",),
            True,
            view.fixes,
        )
    path_fix = _fix(
        "firewall",
        f"allow tcp port {port}{src} to {here.address} in every filter between the hosts "
        "(cloud security group or network ACL, router ACLs, hypervisor filters)",
    )
    if here.outcome is Outcome.TIMED_OUT and status in _LISTENING_WIDE and fw == "accept":
        return Verdict(
            "Something on the path between the hosts drops it",
            (
                f"{where} does not answer{src} (the connect timed out), yet {host} judges "
                f"the port {status} and its own firewall accepts other hosts on it.",
                "So the packets are dropped between the two hosts: check the cloud security "
                "group or network ACL, router ACLs and hypervisor filters for tcp port "
                f"{port}, and this host's own outbound rules (`nft list ruleset`).",
            ),
            True,
            (path_fix,),
        )
    if here.outcome is Outcome.TIMED_OUT and fw == "drop":
        return Verdict(
            f"{host}'s own firewall drops it",
            (f"{where} does not answer{src}; {host}'s firewall drops other hosts on the port.",),
            True,
            view.fixes,
        )
    if here.outcome is Outcome.TIMED_OUT:
        return Verdict(
            "No answer from here; the host cannot tell why",
            (
                f"{where} does not answer{src}. {host} judges the port {status}; its firewall "
                f"verdict is {fw or 'not known'}, so its firewall or the path drops it.",
            ),
            True,
            (*view.fixes, path_fix),
        )
    if here.outcome is Outcome.REFUSED:
        return Verdict(
            "Refused here although the host accepts on the port",
            (
                f"{where} refuses the connection{src}, yet {host} judges the port {status} "
                f"(firewall: {fw or 'not known'}). A filter between rejects it (a REJECT "
                f"rule with tcp-reset), or {host} names another machine from here (DNS, NAT).",
            ),
            True,
            (path_fix,),
        )
    return Verdict(
        f"{here.outcome.value.capitalize()} from here",
        (
            f"{where}{src}: {here.detail or here.outcome.value}. {host} judges the port "
            f"{status}. Check this host's routes (`ip route get {here.address}`) and the "
            "filters between.",
        ),
        True,
        view.fixes,
    )


def _connect_alone(host: str, port: int, here: Attempt, where: str) -> Verdict:
    """With no exporter to ask: what the connect alone can tell."""
    told = {
        Outcome.OK: ("It accepts connections from here.", False),
        Outcome.REFUSED: (
            f"{host} is up and answers, but nothing accepts on port {port} at that address: "
            "the service is not running, listens on loopback only (Flask's app.run() "
            "default), or a firewall rejects it.",
            True,
        ),
        Outcome.TIMED_OUT: (
            "Nothing answers: a firewall on the host or on the path drops the packets, "
            "or the host is down.",
            True,
        ),
        Outcome.NO_ROUTE: (
            f"No route from here (or a router answered host unreachable): check "
            f"`ip route get {here.address}` and the routers between.",
            True,
        ),
        Outcome.RESET: (
            "Something accepted and reset the connection: a proxy or a published container "
            "port whose app does not accept inside.",
            True,
        ),
        Outcome.ERROR: (f"The connect failed: {here.detail}.", True),
    }
    text, problem = told[here.outcome]
    lines = [f"{where}: {here.outcome.value}. {text}"]
    if problem:
        lines.append(
            f"Run `bindscope diagnose {port}` on {host}, or a bindscope exporter there, "
            "to tell which."
        )
    return Verdict("What the connect alone tells", tuple(lines), problem)


def _fix(kind: str, summary: str) -> dict[str, Any]:
    return {"kind": kind, "summary": summary}


def _bracket(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def document(
    target: str,
    attempts: list[Attempt],
    exporter_url: str,
    host_doc: dict[str, Any] | None,
    why_not: str,
    verdict: Verdict,
) -> dict[str, Any]:
    """The versioned document (the shape of the local diagnose's), with the connects and
    the host's own document beside the findings."""
    connect_lines = [
        f"{_bracket(a.address)}  {a.outcome.value}"
        + (f" ({a.detail})" if a.detail and a.outcome is not Outcome.OK else "")
        + f"  in {a.duration * 1000:.0f} ms"
        + (f", from {a.source}" if a.source else "")
        for a in attempts
    ]
    if host_doc is not None:
        host_lines = [f"{exporter_url}: {host_doc.get('subject', '')}: {host_doc.get('result')}"]
        host_lines += [
            f"{f.get('title')}: " + "; ".join(str(x).strip() for x in f.get("lines", []))
            for f in host_doc.get("findings") or []
            if isinstance(f, dict) and f.get("problem")
        ]
    else:
        host_lines = [f"{exporter_url}: no answer ({why_not})"]
    return {
        "version": DOCUMENT_VERSION,
        "target": target,
        "subject": f"{target}, from this host",
        "result": "problem" if verdict.problem else "ok",
        "findings": [
            {
                "step": "connect",
                "title": "Does a TCP connect from here succeed?",
                "lines": connect_lines,
                "problem": not any(a.outcome is Outcome.OK for a in attempts),
            },
            {
                "step": "host",
                "title": "What does the host's exporter say?",
                "lines": host_lines,
                "problem": host_doc is not None and host_doc.get("result") == "problem",
            },
            {
                "step": "verdict",
                "title": verdict.title,
                "lines": list(verdict.lines),
                "problem": verdict.problem,
            },
        ],
        "fixes": list(verdict.fixes),
        "connect": [
            {
                "address": a.address,
                "outcome": a.outcome.name.lower(),
                "detail": a.detail,
                "duration_seconds": round(a.duration, 6),
                "source": a.source,
            }
            for a in attempts
        ],
        "host": host_doc,
    }


def render(doc: dict[str, Any]) -> list[str]:
    out = [f"bindscope diagnose: {doc['subject']}"]
    for n, f in enumerate(doc["findings"], 1):
        out += ["", f"{n}. {f['title']}"]
        out += [f"   {line}" for line in f["lines"]]
    if doc["fixes"]:
        out += ["", f"{len(doc['findings']) + 1}. What to change"]
        for fix in doc["fixes"]:
            out.append(f"   - {fix['summary']}")
            out += [f"       $ {c}" for c in fix.get("commands") or []]
    out += ["", f"Result: {'PROBLEM' if doc['result'] == 'problem' else 'ok'}"]
    return out


def diagnose_remote(host: str, port: int, access: ExporterAccess, timeout: float) -> dict[str, Any]:
    target = f"{_bracket(host)}:{port}"
    attempts = connect_from_here(host, port, timeout)
    host_doc, why_not = None, ""
    try:
        host_doc = ask_exporter(access, port, timeout)
    except FetchError as e:
        why_not = str(e)
        if e.reason is PeerError.HTTP_STATUS and "401" in why_not:
            why_not += "; give --exporter.username and --exporter.password-file"
    view = host_view(host_doc) if host_doc is not None else None
    verdict = join(host, port, attempts, view)
    return document(target, attempts, access.url, host_doc, why_not, verdict)
