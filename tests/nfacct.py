"""Creates nfacct accounting objects in the calling namespace: `python3 nfacct.py NAME...`.

kube-proxy creates its nfacct counters over netlink before its first iptables-restore,
and `-m nfacct --nfacct-name NAME` fails to load while NAME does not exist. The corpus's
kube-proxy entry runs this in the lab's server namespace to do the same; stdlib only, so
no nfacct tool is needed.
"""

from __future__ import annotations

import errno
import socket
import struct
import sys

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ACCT = 7
NFNL_MSG_ACCT_NEW = 0
NFACCT_NAME = 1
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE = 0x1, 0x4, 0x400
NLMSG_ERROR = 2


def create(name: str) -> None:
    """The object NAME, kept as it is when it already exists."""
    value = name.encode() + b"\0"
    attr = struct.pack("HH", 4 + len(value), NFACCT_NAME) + value
    attr += b"\0" * (-len(attr) % 4)
    body = struct.pack("BBH", socket.AF_UNSPEC, 0, 0) + attr  # nfgenmsg, then the name
    kind = (NFNL_SUBSYS_ACCT << 8) | NFNL_MSG_ACCT_NEW
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as s:
        s.send(struct.pack("IHHII", 16 + len(body), kind, flags, 1, 0) + body)
        reply = s.recv(4096)
    if struct.unpack_from("H", reply, 4)[0] != NLMSG_ERROR:
        raise OSError(f"nfacct {name}: unexpected netlink reply")
    err = -struct.unpack_from("i", reply, 16)[0]
    if err not in (0, errno.EBUSY):  # EBUSY: it exists already, which is what we want
        raise OSError(err, f"nfacct {name}: {errno.errorcode.get(err, err)}")


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        create(arg)
