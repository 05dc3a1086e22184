"""The lab's helper processes, each started once inside one namespace and fed on stdin.

listen JSON: holds the listening sockets described until stdin ends: TCP ones accept,
    send a banner and close, UDP ones send each datagram back to its sender.
probe: per line, a JSON list of [address, port] (TCP) or [address, port, "udp"]; answers a
    JSON list of outcomes, each connect or datagram concurrent and bounded by the timeout
    on the command line.
scan: per line, a JSON object {"config": YAML}; answers {"metrics": text}: one scan of
    this namespace by the exporter's own Scanner, rendered as the exporter serves it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import selectors
import socket
import sys
import time

# A connect that completes proves only that the SYN got in: the server answers first, so
# a probe is 'ok' only once the connection really carried data (as telnet shows a banner).
BANNER = b"lab\n"


def sockaddr(address: str, port: int) -> tuple:
    """A link-local address's `%zone` as the scope id bind and connect take (the string
    form alone is refused with EINVAL)."""
    host, _, zone = address.partition("%")
    return (host, port, 0, socket.if_nametoindex(zone)) if zone else (host, port)


def listen(spec: list[dict]) -> None:
    sel = selectors.DefaultSelector()
    for s in spec:
        family = socket.AF_INET6 if ":" in s["address"] else socket.AF_INET
        kind = socket.SOCK_DGRAM if s.get("protocol") == "udp" else socket.SOCK_STREAM
        sock = socket.socket(family, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(s.get("v6only", 0)))
        if s.get("device"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, s["device"].encode())
        sock.bind(sockaddr(s["address"], s["port"]))
        if kind == socket.SOCK_STREAM:
            sock.listen(4096)
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, kind)
    sel.register(sys.stdin, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            if key.fileobj is sys.stdin:
                if not sys.stdin.readline():
                    return
                continue
            sock = key.fileobj
            with contextlib.suppress(BlockingIOError):
                if key.data == socket.SOCK_DGRAM:
                    data, peer = sock.recvfrom(2048)  # type: ignore[union-attr]
                    sock.sendto(data, peer)  # type: ignore[union-attr]
                else:
                    conn = sock.accept()[0]  # type: ignore[union-attr]
                    with contextlib.suppress(OSError):
                        conn.send(BANNER)
                    conn.close()


def probe(targets: list[list], timeout: float) -> list[str]:
    """'ok', 'refused', 'timeout' or an errno name for each [address, port(, "udp")].

    TCP is 'ok' when the listener's banner arrived: a ruleset that accepts the SYN and
    drops or rejects the packets after it lets a connect complete, and no data through.
    UDP is 'ok' when the datagram came back. The socket stays unconnected: a wildcard
    listener answers from the address its route picks, not always the one it was sent
    to, so the reply is known by its payload."""
    sel = selectors.DefaultSelector()
    out = ["timeout"] * len(targets)
    for i, (address, port, *proto) in enumerate(targets):
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        udp = proto == ["udp"]
        s = socket.socket(family, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
        s.setblocking(False)
        if udp:
            payload = f"lab {i}".encode()
            s.sendto(payload, sockaddr(address, port))
            sel.register(s, selectors.EVENT_READ, (i, payload))  # the answer: it, sent back
            continue
        rc = s.connect_ex(sockaddr(address, port))
        if rc in (0, errno.EINPROGRESS):
            sel.register(s, selectors.EVENT_WRITE, (i, BANNER))
        else:
            out[i] = errno.errorcode.get(rc, str(rc))
            s.close()
    deadline = time.monotonic() + timeout
    while sel.get_map() and (left := deadline - time.monotonic()) > 0:
        for key, _ in sel.select(left):
            s, (i, answer) = key.fileobj, key.data
            if key.events == selectors.EVENT_WRITE:
                rc = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # type: ignore[union-attr]
                if rc == 0:  # connected: now the banner
                    sel.modify(s, selectors.EVENT_READ, key.data)
                    continue
                out[i] = errno.errorcode.get(rc, str(rc))
            else:
                try:
                    got = s.recv(len(answer))  # type: ignore[union-attr]
                    out[i] = "ok" if got == answer else "closed"
                except OSError as e:
                    out[i] = errno.errorcode.get(e.errno or 0, str(e))
            sel.unregister(s)
            s.close()  # type: ignore[union-attr]
    for key in list(sel.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    return [{"ECONNREFUSED": "refused"}.get(o, o) for o in out]


def scan(config_text: str) -> str:
    from bindscope.collector.snapshot import render
    from bindscope.config.load import parse_config
    from bindscope.scan import Scanner

    # a new Scanner each time: legacy iptables changes do not move the generation its
    # netfilter cache keys on
    scanner = Scanner(namespaces=False, published=False)
    return render(scanner.scan(parse_config(config_text, "lab.yml"))).decode()


def main() -> None:
    mode = sys.argv[1]
    if mode == "listen":
        listen(json.loads(sys.argv[2]))
        return
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if mode == "probe":
            answer: object = probe(request, float(sys.argv[2]))
        else:
            answer = {"metrics": scan(request["config"])}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
