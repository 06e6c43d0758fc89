"""A self-signed certificate for localhost, for the tests of TLS clusters."""

import shutil
import subprocess

import pytest

#: Marks a test that needs the openssl command.
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None,
                                   reason="needs the openssl command")


def self_signed(tmp_path) -> tuple[str, str]:
    """(key, certificate) file paths of a fresh self-signed certificate for localhost."""
    key, cert = str(tmp_path / "key.pem"), str(tmp_path / "cert.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return key, cert
