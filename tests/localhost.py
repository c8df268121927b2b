"""Helper of the multi-process tests: a TCP port on 127.0.0.1 for a jax.distributed coordinator."""

import socket


def free_port() -> int:
  """A port that was free a moment ago (bound to port 0, read, released); another process could
  still take it before the coordinator binds it."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]
