"""The HTTP layer's small decisions, without a server."""

import pytest

from bindscope.web.server import ListenAddressError, accepts_gzip, parse_listen_address


@pytest.mark.parametrize(
    ("header", "gzip"),
    [
        ("gzip", True),
        ("gzip, deflate, br", True),
        ("deflate, gzip;q=0.5", True),
        ("*", True),
        ("gzip;q=0", False),
        ("gzip; q=0.0", False),
        ("deflate", False),
        ("", False),
        ("gzip;q=bogus", False),
    ],
    ids=lambda v: repr(v),
)
def test_accepts_gzip(header, gzip):
    assert accepts_gzip(header) is gzip


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (":9917", ("", 9917)),
        ("0.0.0.0:9917", ("0.0.0.0", 9917)),
        ("[::1]:9917", ("::1", 9917)),
        ("localhost:0", ("localhost", 0)),
    ],
    ids=["all interfaces", "ipv4 wildcard", "ipv6 in brackets", "name"],
)
def test_parse_listen_address(text, expected):
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize("text", ["9917", "::1:9917", "host:port", ":70000"], ids=lambda v: v)
def test_bad_listen_address(text):
    with pytest.raises(ListenAddressError):
        parse_listen_address(text)
