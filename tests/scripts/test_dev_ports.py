"""scripts/dev.py's port check: a port whose last connections linger in TIME_WAIT is free."""

from __future__ import annotations

import socket

from scripts.dev import port_is_free


def test_a_port_with_connections_in_time_wait_is_free() -> None:
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        served, _ = listener.accept()
        # The server closes first, as a stopping web server does: its side is in TIME_WAIT.
        served.close()
        client.recv(1)
        client.close()
        assert not port_is_free(port)  # still listening
    assert port_is_free(port)


def test_a_port_with_a_listener_is_not_free() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert not port_is_free(listener.getsockname()[1])
