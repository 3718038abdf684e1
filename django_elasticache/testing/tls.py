"""A throwaway certificate authority, so the local cluster can speak TLS like ElastiCache.

ElastiCache clusters with in-transit encryption accept only TLS, on every node and on the
configuration endpoint, and each node's certificate names its hostname rather than its IP.
To test a client against that, the local cluster needs certificates a client can verify:
this module makes a private CA with trustme and writes the server certificates it issues
to a temporary directory, since memcached loads its certificate and key from files.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
import shutil
import ssl
import tempfile
import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .lifecycle import Stoppable

try:
    import trustme
except ImportError as missing:
    raise ImportError(
        "the TLS part of django_elasticache.testing needs trustme, which makes the test "
        "certificates: pip install django-elasticache[testing]"
    ) from missing

if TYPE_CHECKING:
    from .cluster import Certificate

# Names are checked before they reach a certificate: a hostname of DNS labels (a wildcard
# first label allowed), or an IP literal; nothing a test mistyped passes as a name.
DNS_NAME = re.compile(r"(\*\.)?[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")
MAX_DNS_NAME = 253


def check_names(names: Sequence[str]) -> list[str]:
    """Return the hostnames and IP literals a certificate is to name, or raise ValueError."""
    if isinstance(names, str) or not names:
        raise ValueError(f"names must be a non-empty sequence of names, got {names!r}")
    for name in names:
        try:
            ipaddress.ip_address(name)
        except ValueError:
            if len(name) > MAX_DNS_NAME or not DNS_NAME.fullmatch(name):
                raise ValueError(f"not a hostname or an IP address: {name!r}") from None
    return list(names)


class CertificateAuthority(Stoppable):
    """A private CA whose server certificates live in a temporary directory.

    The CA is made at construction. Its directory (keys included) is removed by stop(),
    by the context manager, when the object is garbage collected, or at the latest when
    the interpreter exits.
    """

    def __init__(self) -> None:
        self._ca = trustme.CA(organization_name="django-elasticache throwaway CA")
        self._ca_pem = self._ca.cert_pem.bytes().decode("ascii")
        self._lock = threading.Lock()
        self._serials = itertools.count(1)
        self._directory = tempfile.mkdtemp(prefix="django-elasticache-ca-")
        self._finalizer = weakref.finalize(
            self, shutil.rmtree, self._directory, ignore_errors=True
        )
        self._ca.cert_pem.write_to_path(self.ca_file)

    @property
    def directory(self) -> str:
        """The temporary directory holding the CA certificate and every issued one."""
        return self._directory

    @property
    def ca_file(self) -> str:
        """The CA certificate (PEM), what a client passes as its cafile."""
        return os.path.join(self._directory, "ca.pem")

    @property
    def ca_pem(self) -> str:
        """The CA certificate as PEM text, still usable after stop()."""
        return self._ca_pem

    def issue(self, names: Sequence[str]) -> Certificate:
        """Issue a server certificate for these hostnames and IP literals.

        Returns the paths of the certificate and of its unencrypted private key, both PEM.
        """
        leaf = self._ca.issue_cert(*check_names(names))
        with self._lock:
            if not self._finalizer.alive:
                raise RuntimeError("CertificateAuthority has been cleaned up")
            stem = os.path.join(self._directory, f"server-{next(self._serials)}")
            leaf.cert_chain_pems[0].write_to_path(f"{stem}.pem")
            leaf.private_key_pem.write_to_path(f"{stem}.key")
        return f"{stem}.pem", f"{stem}.key"

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only this CA, verifies and checks hostnames."""
        return ssl.create_default_context(cadata=self._ca_pem)

    def server_context(self, names: Sequence[str]) -> ssl.SSLContext:
        """A server context presenting a fresh certificate for these names."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ca.issue_cert(*check_names(names)).configure_cert(context)
        return context

    def stop(self) -> None:
        """Remove the directory with every key and certificate (idempotent)."""
        self._finalizer()

    def __repr__(self) -> str:
        state = "" if self._finalizer.alive else " (cleaned up)"
        return f"<CertificateAuthority {self._directory}{state}>"
