"""Flynn's `gen-tls-cert` bootstrap action: the cluster's TLS certificate and the pin clients
check it by.

`{"hosts": ["example.com", "*.example.com"], "ca_cert": PEM, "cert": PEM, "key": PEM}` makes a
cluster CA (self-signed, `CA:true`, `keyCertSign`) and a leaf certificate for `hosts` (each one a
subjectAltName: a DNS name, or an IP address; `serverAuth`) signed by it. The CA's private key
is never kept: it signs the leaf and is dropped, so nothing can issue another certificate under
this CA; the CA certificate is only what git and browsers are told to trust (the controller
serves it at `GET /ca-cert`).

Keys are ECDSA P-256: a handshake costs the router (which terminates TLS) a fraction of what
RSA 2048 costs, generating is instant, and every client of a cluster (Go's TLS in the 2015
CLI, git through OpenSSL or GnuTLS, browsers) speaks it. The CA is valid for 10 years; the
leaf for 2 years, under the 825 days Apple's systems accept for a TLS server certificate
(a CA key that is thrown away cannot renew it: a new bootstrap or the operator's own
certificate replaces it).

An operator's own certificate: when `cert` and `key` are given (the manifest fills them from
`TLS_CERT` / `TLS_KEY`, and `ca_cert` from `TLS_CA`) they are used as they are, after checking
that they parse, that the key is the certificate's and (with `ca_cert`) that the CA issued it.
`cert` may be a chain: its first certificate is the leaf.

A rerun keeps the certificate the cluster serves: with `"keep_app": "router"`, a running job of
that app (by its `flynn-controller.app_name`) whose env has `TLSCERT` and `TLSKEY` gives the
certificate and key, and a running job with `CA_CERT` (the controller) the CA; otherwise a
rerun would print a pin that no router serves.

Step data: `{"ca_cert", "cert", "key", "pin"}` (PEM, PEM, PEM, and base64, padded, of the
SHA-256 of the leaf's DER — what `flynn cluster add -p` takes, see flynn-2015-api §1.3). The
key is a secret: no output shows it (`State.secrets`).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import re
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flynn_host.bootstrap.runner import Action, State, StepError

CA_VALIDITY = datetime.timedelta(days=3650)
LEAF_VALIDITY = datetime.timedelta(days=730)
# certificates start a little in the past, for hosts whose clocks lag
BACKDATE = datetime.timedelta(hours=1)
# a DNS name, optionally with one leading wildcard label
HOST_RE = re.compile(
    r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$", re.I
)


def _key_usage(signs_certificates: bool) -> x509.KeyUsage:
    """Digital signatures (ECDSA handshakes), and certificate/CRL signing for the CA only."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def pin(cert: x509.Certificate) -> str:
    """The TLS pin of `cert`: base64 (standard, padded) of the SHA-256 of its DER bytes."""
    der = cert.public_bytes(serialization.Encoding.DER)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Flynn"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
        ]
    )


def generate(hosts: list[str]) -> dict[str, str]:
    """A new CA and a leaf for `hosts` signed by it: `{"ca_cert", "cert", "key", "pin"}`."""
    now = datetime.datetime.now(datetime.UTC) - BACKDATE
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("Flynn Ephemeral CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + LEAF_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    del ca_key  # never kept: nothing can sign under this CA again
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return {"ca_cert": _pem(ca), "cert": _pem(leaf), "key": key_pem, "pin": pin(leaf)}


def given(ca_pem: str, cert_pem: str, key_pem: str) -> dict[str, str]:
    """The operator's certificate, checked: `{"ca_cert", "cert", "key", "pin"}`."""
    try:
        chain = x509.load_pem_x509_certificates(cert_pem.encode())
    except ValueError as exc:
        raise StepError(f"cert is not a PEM certificate: {exc}") from None
    leaf = chain[0]
    try:
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        # TypeError: an encrypted key (bootstrap cannot ask for its password)
        raise StepError(f"key is not an unencrypted PEM private key: {exc}") from None
    if key.public_key() != leaf.public_key():
        raise StepError("key is not the private key of cert (their public keys differ)")
    if ca_pem:
        try:
            (ca, *_) = x509.load_pem_x509_certificates(ca_pem.encode())
        except ValueError as exc:
            raise StepError(f"ca_cert is not a PEM certificate: {exc}") from None
        issuer = chain[-1] if len(chain) > 1 else leaf
        try:
            issuer.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            if issuer.fingerprint(hashes.SHA256()) != ca.fingerprint(hashes.SHA256()):
                raise StepError("cert was not issued by ca_cert") from None
    return {"ca_cert": ca_pem, "cert": cert_pem, "key": key_pem, "pin": pin(leaf)}


def _text(step: dict[str, Any], field: str) -> str:
    value = step.get(field) or ""
    if not isinstance(value, str):
        raise StepError(f"{field} must be a PEM string")
    return value.strip() + "\n" if value.strip() else ""


class GenTLSCert(Action):
    def __init__(self, step: dict[str, Any]) -> None:
        super().__init__(step)
        self.ca_cert, self.cert, self.key = (_text(step, f) for f in ("ca_cert", "cert", "key"))
        if bool(self.cert) != bool(self.key):
            raise StepError("cert and key must be given together (TLS_CERT and TLS_KEY)")
        if self.ca_cert and not self.cert:
            raise StepError(
                "ca_cert without cert and key: bootstrap cannot sign with a CA whose key it "
                "does not have (give TLS_CERT and TLS_KEY too, or none of them)"
            )
        hosts = step.get("hosts")
        if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
            raise StepError("hosts must be a list of host names")
        if not self.cert:
            if not hosts:
                raise StepError("hosts must name at least one host")
            for host in hosts:
                if not HOST_RE.match(host) and not self._is_ip(host):
                    raise StepError(
                        f"host {host!r} is not a DNS name or IP address (is CLUSTER_DOMAIN set?)"
                    )
        self.hosts = [h.lower() for h in hosts]
        self.keep_app = step.get("keep_app") or ""
        if not isinstance(self.keep_app, str):
            raise StepError("keep_app must name an app")

    @staticmethod
    def _is_ip(host: str) -> bool:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return False
        return True

    def run(self, state: State) -> Any:
        kept = None if self.cert or not self.keep_app else self.served(state)
        if kept is not None:
            state.progress(f"keeping the certificate the running {self.keep_app} serves")
            data = given(*kept)
        elif self.cert:
            data = given(self.ca_cert, self.cert, self.key)
        else:
            data = generate(self.hosts)
        state.secrets.add(data["key"])
        return data

    def served(self, state: State) -> tuple[str, str, str] | None:
        """(CA, certificate, key) of a running job of `keep_app`, or None."""
        found: tuple[str, str] | None = None
        ca = ""
        for host in state.hosts:
            for job in host.client.list_jobs(active=True).values():
                spec = job.get("job") or {}
                env = (spec.get("config") or {}).get("env") or {}
                app = (spec.get("metadata") or {}).get("flynn-controller.app_name")
                if app == self.keep_app and env.get("TLSCERT") and env.get("TLSKEY"):
                    found = found or (env["TLSCERT"], env["TLSKEY"])
                ca = ca or env.get("CA_CERT") or ""
        return (ca, *found) if found else None
