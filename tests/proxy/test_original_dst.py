"""proxy/original_dst.py: decoding the kernel's sockaddr and refusing unredirected sockets."""

from __future__ import annotations

import socket
import struct

import pytest

from proxy.original_dst import original_dst, parse_sockaddr


def test_parse_ipv4() -> None:
    raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 443) + socket.inet_aton("10.1.2.3") + bytes(8)
    assert parse_sockaddr(raw) == ("10.1.2.3", 443)


def test_parse_ipv6() -> None:
    addr = socket.inet_pton(socket.AF_INET6, "2001:db8::5")
    raw = struct.pack("=H", socket.AF_INET6) + struct.pack("!H", 80) + bytes(4) + addr + bytes(4)
    assert parse_sockaddr(raw) == ("2001:db8::5", 80)


def test_parse_v4_mapped_is_ipv4() -> None:
    addr = socket.inet_pton(socket.AF_INET6, "::ffff:192.0.2.7")
    raw = struct.pack("=H", socket.AF_INET6) + struct.pack("!H", 80) + bytes(4) + addr + bytes(4)
    assert parse_sockaddr(raw) == ("192.0.2.7", 80)


@pytest.mark.parametrize("raw", [b"", b"\x02\x00", struct.pack("=H", 99) + bytes(14)])
def test_parse_rejects_garbage(raw: bytes) -> None:
    with pytest.raises(ValueError):
        parse_sockaddr(raw)


def test_unredirected_socket_has_no_original_destination_or_its_own() -> None:
    # Without a conntrack NAT entry the kernel either refuses (ENOENT) or gives the
    # socket's own address; the fast path treats both as "not redirected".
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    cli = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    try:
        try:
            dst = original_dst(conn)
        except OSError:
            return
        assert dst == conn.getsockname()
    finally:
        for s in (cli, conn, srv):
            s.close()
