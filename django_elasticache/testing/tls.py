"""A throwaway certificate authority, so the local cluster can speak TLS like ElastiCache.

ElastiCache clusters with in-transit encryption accept only TLS, on every node and on the
configuration endpoint, and each node's certificate names its hostname rather than its IP.
To test a client against that, the local cluster needs certificates a client can verify:
this module makes a private CA in a temporary directory and issues server certificates
from it with the ``openssl`` command line, so the package needs no crypto library.
"""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import os
import re
import secrets
import shutil
import ssl
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Sequence
from types import TracebackType

# Generous, yet a hung openssl cannot stall a test run.
OPENSSL_TIMEOUT = 30.0
# Certificates start in the past, so a clock that is slightly off still accepts them.
BACKDATE = datetime.timedelta(hours=1)
CA_VALIDITY = datetime.timedelta(days=30)
CERTIFICATE_VALIDITY = datetime.timedelta(days=7)
# RFC 5280 bounds a commonName to 64 characters; longer names live in subjectAltName only.
MAX_COMMON_NAME = 64
GENERIC_COMMON_NAME = "django-elasticache test server"
# What may go into an openssl config file unquoted: DNS labels, and a wildcard first label.
DNS_NAME = re.compile(r"(\*\.)?[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")
MAX_DNS_NAME = 253
PEM_CERTIFICATE = re.compile(
    r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", flags=re.DOTALL
)

CA_CONFIG = """\
[ req ]
distinguished_name = dn
[ dn ]
[ ca ]
default_ca = throwaway
[ throwaway ]
database = {directory}/index.txt
new_certs_dir = {directory}/issued
serial = {directory}/serial
certificate = {directory}/ca.pem
private_key = {directory}/ca.key
default_md = sha256
policy = policy_any
unique_subject = no
email_in_dn = no
copy_extensions = none
[ policy_any ]
commonName = supplied
[ ca_extensions ]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""
# Python 3.13 verifies with VERIFY_X509_STRICT, which wants the key identifiers, and
# clients that check the purpose want extendedKeyUsage serverAuth.
SERVER_EXTENSIONS = """\
[ server_extensions ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
subjectAltName = @alt_names
[ alt_names ]
{alt_names}
"""

Certificate = tuple[str, str]  # (certificate PEM path, private key PEM path)


class OpenSSLNotFound(RuntimeError):
    """The openssl executable is missing, so no certificate can be made."""

    def __init__(self, openssl: str) -> None:
        super().__init__(
            f"openssl executable {openssl!r} not found; it makes the certificates of a TLS "
            "cluster. Install it (Debian/Ubuntu: `apt-get install openssl`, macOS: "
            "`brew install openssl`) or pass the path of the binary."
        )


def find_openssl(openssl: str = "openssl") -> str:
    """Resolve a command name or path to the openssl executable."""
    path = shutil.which(openssl)
    if path is None:
        raise OpenSSLNotFound(openssl)
    return path


def subject_alt_names(names: Sequence[str]) -> list[str]:
    """Turn hostnames and IP literals into openssl alt_names lines (DNS.n or IP.n).

    Names are checked rather than escaped: they end up in a config file and a subject.
    """
    if isinstance(names, str) or not names:
        raise ValueError(f"names must be a non-empty sequence of names, got {names!r}")
    dns = itertools.count(1)
    ips = itertools.count(1)
    lines = []
    for name in names:
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            if len(name) > MAX_DNS_NAME or not DNS_NAME.fullmatch(name):
                raise ValueError(f"not a hostname or an IP address: {name!r}") from None
            lines.append(f"DNS.{next(dns)} = {name}")
        else:
            lines.append(f"IP.{next(ips)} = {ip}")
    return lines


def first_certificate_der(path: str) -> bytes:
    """The DER bytes of the first certificate in a PEM file: the one a server presents."""
    with open(path, encoding="ascii") as pem:
        match = PEM_CERTIFICATE.search(pem.read())
    if match is None:
        raise ValueError(f"no PEM certificate in {path}")
    return ssl.PEM_cert_to_DER_cert(match.group())


def _asn1_time(moment: datetime.datetime) -> str:
    """The UTCTime form ``openssl ca -startdate`` takes (the 1.1 and 3.x releases alike)."""
    return moment.astimezone(datetime.timezone.utc).strftime("%y%m%d%H%M%SZ")


class CertificateAuthority:
    """A private CA that lives in a temporary directory and issues server certificates.

    The CA is made at construction. Its directory (keys included) is removed by cleanup(),
    by the context manager, when the object is garbage collected, or at the latest when
    the interpreter exits.
    """

    def __init__(self, *, openssl: str = "openssl") -> None:
        self._openssl = find_openssl(openssl)
        self._lock = threading.Lock()
        self._serials = itertools.count(1)
        self._directory = tempfile.mkdtemp(prefix="django-elasticache-ca-")
        self._finalizer = weakref.finalize(
            self, shutil.rmtree, self._directory, ignore_errors=True
        )
        try:
            self._create()
        except BaseException:
            self.cleanup()
            raise

    @property
    def directory(self) -> str:
        """The temporary directory holding the CA, its keys and every issued certificate."""
        return self._directory

    @property
    def ca_file(self) -> str:
        """The CA certificate (PEM), what a client passes as its cafile."""
        return self._path("ca.pem")

    @property
    def ca_pem(self) -> str:
        """The CA certificate as PEM text, still usable after cleanup()."""
        return self._ca_pem

    def issue(self, names: Sequence[str]) -> Certificate:
        """Issue a server certificate for these hostnames and IP literals.

        Returns the paths of the certificate and of its unencrypted private key, both PEM.
        The first name is also the subject's commonName when it fits.
        """
        alt_names = subject_alt_names(names)
        common_name = names[0] if len(names[0]) <= MAX_COMMON_NAME else GENERIC_COMMON_NAME
        with self._lock:
            if not self._finalizer.alive:
                raise RuntimeError("CertificateAuthority has been cleaned up")
            stem = self._path(f"server-{next(self._serials)}")
            extensions = f"{stem}.cnf"
            with open(extensions, "w", encoding="ascii") as config:
                config.write(SERVER_EXTENSIONS.format(alt_names="\n".join(alt_names)))
            options = ["-extfile", extensions, "-extensions", "server_extensions"]
            self._sign(stem, common_name, CERTIFICATE_VALIDITY, options)
        return f"{stem}.pem", f"{stem}.key"

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only this CA, verifies and checks hostnames."""
        return ssl.create_default_context(cadata=self._ca_pem)

    def server_context(self, names: Sequence[str]) -> ssl.SSLContext:
        """A server context presenting a fresh certificate for these names."""
        certificate, key = self.issue(names)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certificate, key)
        return context

    def cleanup(self) -> None:
        """Remove the directory with every key and certificate (idempotent)."""
        self._finalizer()

    def __enter__(self) -> CertificateAuthority:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        state = "" if self._finalizer.alive else " (cleaned up)"
        return f"<CertificateAuthority {self._directory}{state}>"

    # Helpers

    def _path(self, name: str) -> str:
        return os.path.join(self._directory, name)

    def _create(self) -> None:
        os.mkdir(self._path("issued"))
        with open(self._path("index.txt"), "w", encoding="ascii"):
            pass
        # A random first serial, so two throwaway CAs are unlikely to reuse one.
        with open(self._path("serial"), "w", encoding="ascii") as serial:
            serial.write(f"{secrets.randbits(63) | 1 << 62:X}\n")
        with open(self._path("ca.cnf"), "w", encoding="ascii") as config:
            config.write(CA_CONFIG.format(directory=self._directory))
        # A random name, so a client trusting another throwaway CA cannot mistake it for us.
        name = f"django-elasticache throwaway CA {secrets.token_hex(4)}"
        options = ["-selfsign", "-extensions", "ca_extensions"]
        self._sign(self._path("ca"), name, CA_VALIDITY, options)
        with open(self.ca_file, encoding="ascii") as pem:
            self._ca_pem = pem.read()

    def _sign(
        self, stem: str, common_name: str, validity: datetime.timedelta, options: list[str]
    ) -> None:
        """Make a P-256 key and a request for it, then sign the request with the CA key.

        ``openssl ca`` rather than ``req -x509`` or ``x509 -req``: only it can backdate
        notBefore with the OpenSSL 3.0 of Debian 12.
        """
        now = datetime.datetime.now(datetime.timezone.utc)
        config = self._path("ca.cnf")
        self._run(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{stem}.key", "-out", f"{stem}.csr", "-subj", f"/CN={common_name}",
            "-config", config,
        )  # fmt: skip
        self._run(
            "ca", "-batch", "-notext", "-config", config, "-keyfile", self._path("ca.key"),
            "-in", f"{stem}.csr", "-out", f"{stem}.pem",
            "-startdate", _asn1_time(now - BACKDATE), "-enddate", _asn1_time(now + validity),
            *options,
        )  # fmt: skip

    def _run(self, *arguments: str) -> None:
        try:
            result = subprocess.run(
                [self._openssl, *arguments],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=OPENSSL_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"openssl {arguments[0]} did not finish within {OPENSSL_TIMEOUT} s"
            ) from None
        if result.returncode != 0:
            message = result.stderr.decode("utf-8", "replace").strip()
            raise RuntimeError(
                f"openssl {arguments[0]} failed with status {result.returncode}: {message}"
            )
