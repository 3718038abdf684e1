"""What ElastiCache Serverless for memcached refuses that stock memcached accepts.

The service has one endpoint, speaks only TLS, and has no Auto Discovery: ``config get
cluster`` gets ``ERROR``, as from stock memcached, so it needs no rule here. It differs
from memcached in a few commands a relay front (see relay.py) answers itself:

- ``flush_all`` with a delay gets ``CLIENT_ERROR``; a plain ``flush_all`` (or
  ``flush_all 0``) works.
- a ``get``/``gets`` command line longer than 16 KB is refused, so a client must split
  large ``get_many`` calls. AWS documents the cap, not the reply; the emulation answers
  ``CLIENT_ERROR line too long``, memcached's own words for an overlong command line,
  which pymemcache and pylibmc both surface as a client error.
"""

from __future__ import annotations

MAX_GET_LINE = 16 * 1024
MULTI_KEY_GETS = (b"get", b"gets")
# pymemcache sends "flush_all 0": a delay of nothing is no delay.
NO_DELAY = (b"0", b"noreply")
DELAYED_FLUSH_REPLY = b"CLIENT_ERROR flush_all with a delay is not supported\r\n"
GET_TOO_LONG_REPLY = b"CLIENT_ERROR line too long\r\n"


class ServerlessRules:
    """Rules for a relay front that stands in for a serverless cache's endpoint."""

    def reply_to(self, line: bytes) -> bytes | None:
        words = line.split()
        if not words:
            return None
        if words[0] == b"flush_all" and any(word not in NO_DELAY for word in words[1:]):
            return DELAYED_FLUSH_REPLY
        if words[0] in MULTI_KEY_GETS and len(line) > MAX_GET_LINE:
            return GET_TOO_LONG_REPLY
        return None
