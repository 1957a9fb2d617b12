"""`gen-tls-cert`: the cluster CA and leaf certificate, checked with `cryptography` and with
`openssl` (verification, SANs, the pin clients compute), the operator's own certificate, and
bad input."""

from __future__ import annotations

import base64
import datetime
import hashlib
import io
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flynn_host.bootstrap.gentlscert import GenTLSCert, generate
from flynn_host.bootstrap.manifest import packaged_manifest, parse_manifest
from flynn_host.bootstrap.output import json_logger
from flynn_host.bootstrap.runner import State, StepError, run_steps

HOSTS = ["example.com", "*.example.com"]


def step(**fields: Any) -> dict[str, Any]:
    return {"id": "cert", "action": "gen-tls-cert", "hosts": HOSTS, **fields}


@pytest.fixture(scope="module")
def made() -> dict[str, str]:
    return GenTLSCert(step()).run(State(hosts=[]))


def test_leaf_verifies_against_the_ca(made: dict[str, str], tmp_path: Path) -> None:
    ca = x509.load_pem_x509_certificate(made["ca_cert"].encode())
    leaf = x509.load_pem_x509_certificate(made["cert"].encode())
    leaf.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == HOSTS
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert leaf.public_key().curve.name == "secp256r1"
    days = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days
    assert days == 730 and (ca.not_valid_after_utc - ca.not_valid_before_utc).days == 3650
    assert leaf.not_valid_before_utc < datetime.datetime.now(datetime.UTC)
    assert ca.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Flynn"
    # the key is the leaf's
    key = serialization.load_pem_private_key(made["key"].encode(), password=None)
    assert key.public_key() == leaf.public_key()

    # and what OpenSSL says: the chain verifies for serverAuth, for a name under the wildcard
    (tmp_path / "ca.pem").write_text(made["ca_cert"])
    (tmp_path / "leaf.pem").write_text(made["cert"])
    ok = subprocess.run(
        ["openssl", "verify", "-CAfile", str(tmp_path / "ca.pem"), "-purpose", "sslserver",
         "-verify_hostname", "controller.example.com", str(tmp_path / "leaf.pem")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert ok.returncode == 0 and ok.stdout.strip().endswith(": OK"), ok.stdout + ok.stderr
    bad = subprocess.run(
        ["openssl", "verify", "-CAfile", str(tmp_path / "ca.pem"),
         "-verify_hostname", "example.org", str(tmp_path / "leaf.pem")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode != 0


def test_pin_is_what_openssl_computes(made: dict[str, str]) -> None:
    """`openssl x509 -outform der | sha256 | base64`: the formula of the 2015 CLI's pin."""
    der = subprocess.run(
        ["openssl", "x509", "-outform", "der"], input=made["cert"].encode(), capture_output=True
    ).stdout
    digest = subprocess.run(
        ["openssl", "dgst", "-sha256", "-binary"], input=der, capture_output=True
    ).stdout
    expected = subprocess.run(["base64"], input=digest, capture_output=True).stdout
    assert made["pin"] == expected.decode().strip()
    assert len(made["pin"]) == 44 and made["pin"].endswith("=")


def test_ip_hosts_become_ip_sans() -> None:
    leaf = x509.load_pem_x509_certificate(generate(["10.0.0.1", "a.example"])["cert"].encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["a.example"]


def test_the_key_is_a_secret_and_the_rest_is_shown() -> None:
    out = io.StringIO()
    s = State(hosts=[], emit=json_logger(out))
    assert run_steps([step()], {"gen-tls-cert": GenTLSCert}, s)
    data = s.step_data["cert"]
    assert data["key"] in s.secrets
    done = json.loads(out.getvalue().splitlines()[-1])["data"]
    assert done["key"] == "(secret)"
    assert done["cert"] == data["cert"] and done["pin"] == data["pin"]
    assert "PRIVATE KEY" not in out.getvalue()


def own_cert(ca_key: ec.EllipticCurvePrivateKey | None = None) -> tuple[str, str, str]:
    """(ca PEM, leaf PEM, leaf key PEM) made here as an operator would."""
    ca_key = ca_key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "My CA")])
    now = datetime.datetime.now(datetime.UTC)
    ca = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(ca_key.public_key()).serial_number(1)
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mine")]))
        .issuer_name(name).public_key(key.public_key()).serial_number(2)
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip

    def pem(c: x509.Certificate) -> str:
        return c.public_bytes(serialization.Encoding.PEM).decode()

    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()
    return pem(ca), pem(leaf), key_pem


def test_the_operators_certificate_is_used_as_given() -> None:
    ca, cert, key = own_cert()
    s = State(hosts=[])
    data = GenTLSCert(step(ca_cert=ca, cert=cert, key=key)).run(s)
    assert (data["ca_cert"], data["cert"], data["key"]) == (ca, cert, key)
    der = x509.load_pem_x509_certificate(cert.encode()).public_bytes(serialization.Encoding.DER)
    assert data["pin"] == base64.b64encode(hashlib.sha256(der).digest()).decode()
    assert key in s.secrets
    # without a CA, too (a certificate from a public CA the clients trust already)
    assert GenTLSCert(step(cert=cert, key=key)).run(s)["ca_cert"] == ""


def test_the_operators_certificate_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """TLS_CA / TLS_CERT / TLS_KEY hold PEM text, line breaks and all: the manifest's escaped
    `getenv` puts them into its JSON strings intact."""
    ca, cert, key = own_cert()
    monkeypatch.setenv("CLUSTER_DOMAIN", "example.com")
    for name, value in (("TLS_CA", ca), ("TLS_CERT", cert), ("TLS_KEY", key)):
        monkeypatch.setenv(name, value)
    data = {"Singleton": True, "SortedHostIPs": ["10.0.0.1"]}
    steps = parse_manifest(packaged_manifest().read_text(), "p", data)
    (cert_step,) = [s for s in steps if s["id"] == "controller-cert"]
    assert cert_step["hosts"] == HOSTS
    data = GenTLSCert(cert_step).run(State(hosts=[]))
    assert (data["ca_cert"], data["cert"], data["key"]) == (ca, cert, key)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"hosts": []}, "hosts must name at least one host"),
        ({"hosts": "example.com"}, "hosts must be a list"),
        ({"hosts": ["", "*."]}, "host '' is not a DNS name or IP address \\(is CLUSTER_DOMAIN set"),
        ({"hosts": ["a b"]}, "host 'a b' is not a DNS name"),
        ({"cert": "x"}, "cert and key must be given together"),
        ({"key": "x"}, "cert and key must be given together"),
        ({"ca_cert": "x"}, "ca_cert without cert and key"),
        ({"cert": 5, "key": "x"}, "cert must be a PEM string"),
    ],
)
def test_bad_fields(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(StepError, match=message):
        GenTLSCert(step(**fields))


def test_a_bad_certificate_is_refused() -> None:
    ca, cert, key = own_cert()
    other_ca, other_cert, other_key = own_cert()
    s = State(hosts=[])
    cases = [
        ({"cert": "not a cert", "key": key}, "cert is not a PEM certificate"),
        ({"cert": cert, "key": "not a key"}, "key is not an unencrypted PEM private key"),
        ({"cert": cert, "key": other_key}, "key is not the private key of cert"),
        ({"ca_cert": other_ca, "cert": cert, "key": key}, "cert was not issued by ca_cert"),
        ({"ca_cert": "junk", "cert": cert, "key": key}, "ca_cert is not a PEM certificate"),
    ]
    for fields, message in cases:
        with pytest.raises(StepError, match=message):
            GenTLSCert(step(**fields)).run(s)
    assert s.secrets == set()


def test_a_rerun_keeps_the_certificate_the_running_router_serves(made: dict[str, str]) -> None:
    from tests.bootstrap_fakes import host_state

    state, host = host_state()
    # no router yet: a new certificate
    assert GenTLSCert(step(keep_app="router")).run(state)["pin"] != made["pin"]
    host.add_job({"id": "h1-ctl", "metadata": {"flynn-controller.app_name": "controller"},
                  "config": {"env": {"CA_CERT": made["ca_cert"]}}})  # fmt: skip
    host.add_job({"id": "h1-router", "metadata": {"flynn-controller.app_name": "router"},
                  "config": {"env": {"TLSCERT": made["cert"], "TLSKEY": made["key"]}}})  # fmt: skip
    kept = GenTLSCert(step(keep_app="router")).run(state)
    assert kept == made and made["key"] in state.secrets
    # the operator's own certificate still wins
    other = GenTLSCert(step()).run(State(hosts=[]))
    given = GenTLSCert(step(keep_app="router", cert=other["cert"], key=other["key"])).run(state)
    assert given["pin"] == other["pin"]
