"""Authentication for the serving plane: mutual TLS with a per-run CA, identities bound to roles.

`create_pki(dir, roles)` makes a throw-away CA and one key + certificate per role (`marl-sd serve
up` does this for every run). The certificate's common name is the role: `verifier`,
`controller`, `operator` (the launcher and tools) and `client-<user id>`. Server certificates name
their role as a DNS SAN (`verifier.marl-sd`, `controller.marl-sd`) and callers check it, so a
process holding another role's certificate cannot pose as the controller or a verifier. Servers
require a client certificate from the run's CA and read the caller's role in each handler.

Plain text only with an explicit `insecure` flag, and only on loopback addresses.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SERVER_ROLES = ("verifier", "controller")
NAME_SUFFIX = ".marl-sd"


class SecurityError(ValueError):
    """Security settings that cannot work (missing certificates, plaintext off loopback)."""


def _name(cn: str):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def create_pki(directory: Path, roles: list[str], days: int = 2) -> Path:
    """A fresh CA and a key + certificate for each role under `directory` (ca.pem, ROLE.key, ROLE.pem)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("marl-sd run CA"))
        .issuer_name(_name("marl-sd run CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role in roles:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder()
            .subject_name(_name(role))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
        )
        if role in SERVER_ROLES:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(role + NAME_SUFFIX)]), critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        path = directory / f"{role}.key"
        path.write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        path.chmod(0o600)
        (directory / f"{role}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return directory


@dataclass(frozen=True)
class Security:
    """How one process talks: as `role` with the run's certificates in `tls_dir`, or in plain
    text (`tls_dir` None, loopback only)."""

    tls_dir: Path | None
    role: str = "operator"

    @classmethod
    def insecure(cls) -> Security:
        return cls(None)

    @property
    def enabled(self) -> bool:
        return self.tls_dir is not None

    def _read(self, name: str) -> bytes:
        path = Path(self.tls_dir) / name
        if not path.exists():
            raise SecurityError(f"{path} not found: the run's PKI has no certificate for role '{self.role}'")
        return path.read_bytes()

    def check_address(self, host: str) -> None:
        if not self.enabled and not is_loopback(host):
            raise SecurityError(f"plain text is allowed on loopback only, not on {host}: use TLS (--tls DIR --role ROLE)")

    def add_port(self, server, host: str, port: int) -> int:
        """Bind `server` on host:port, with mutual TLS unless insecure."""
        self.check_address(host)
        if not self.enabled:
            return server.add_insecure_port(f"{host}:{port}")
        creds = grpc.ssl_server_credentials(
            [(self._read(f"{self.role}.key"), self._read(f"{self.role}.pem"))],
            root_certificates=self._read("ca.pem"),
            require_client_auth=True,
        )
        return server.add_secure_port(f"{host}:{port}", creds)

    def channel(self, addr: str, server_role: str, options: list | None = None) -> grpc.aio.Channel:
        """A channel to a `server_role` process; with TLS, its certificate must name that role."""
        opts = list(options or [("grpc.use_local_subchannel_pool", 1)])
        self.check_address(addr.rsplit(":", 1)[0])
        if not self.enabled:
            return grpc.aio.insecure_channel(addr, options=opts)
        creds = grpc.ssl_channel_credentials(self._read("ca.pem"), self._read(f"{self.role}.key"), self._read(f"{self.role}.pem"))
        return grpc.aio.secure_channel(addr, creds, options=opts + [("grpc.ssl_target_name_override", server_role + NAME_SUFFIX)])

    def cli_args(self) -> list[str]:
        return ["--tls", str(self.tls_dir), "--role", self.role] if self.enabled else ["--insecure"]

    def as_role(self, role: str) -> Security:
        return Security(self.tls_dir, role)


def caller_role(context) -> str | None:
    """The authenticated caller's role (certificate CN); None on a plain-text server."""
    vals = context.auth_context().get("x509_common_name")
    return vals[0].decode() if vals else None


def client_user(role: str | None) -> int | None:
    """The user id a `client-<id>` role may act for."""
    if role and role.startswith("client-") and role[7:].isdigit():
        return int(role[7:])
    return None


def add_security_args(p) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tls", metavar="DIR", help="mutual TLS with the run's CA and this role's certificate in DIR")
    g.add_argument("--insecure", action="store_true", help="plain text (refused on addresses other than loopback)")
    p.add_argument("--role", default=None, help="with --tls: this process's role (its certificate's name)")


def security_from_args(a, default_role: str) -> Security:
    if a.tls:
        return Security(Path(a.tls), a.role or default_role)
    if not a.insecure:
        raise SecurityError("choose --tls DIR (mutual TLS) or --insecure (plain text on loopback)")
    return Security.insecure()


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"
