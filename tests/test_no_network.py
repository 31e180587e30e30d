"""The test suite's network guard (conftest.py): only localhost can be reached."""

import socket
import threading

import pytest

from conftest import NetworkBlocked


def test_a_remote_address_is_refused_before_any_packet():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with pytest.raises(NetworkBlocked, match="192.0.2.1"):
        s.connect(("192.0.2.1", 443))  # TEST-NET-1: documentation range, never routed
    s.close()


def test_localhost_still_works():
    """Loopback passes the guard, through connect and connect_ex, by address and by name: a local
    server answers what it was sent (reversed, so the bytes are its answer, not an echo of ours)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.settimeout(5)
    srv.bind(("127.0.0.1", 0))
    srv.listen(2)
    port = srv.getsockname()[1]

    def serve():
        for _ in range(2):
            conn, _ = srv.accept()
            with conn:
                conn.sendall(conn.recv(64)[::-1])

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:  # socket.connect
            c.sendall(b"ping")
            assert c.recv(64) == b"gnip"
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as c:
            c.settimeout(5)
            assert c.connect_ex(("localhost", port)) == 0
            c.sendall(b"pong")
            assert c.recv(64) == b"gnop"
    finally:
        t.join(5)
        srv.close()
    assert not t.is_alive()
