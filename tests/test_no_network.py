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
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    t = threading.Thread(target=lambda: srv.accept()[0].close())
    t.start()
    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    c.connect(("127.0.0.1", port))
    c.close()
    t.join(5)
    srv.close()
