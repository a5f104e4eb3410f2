"""What a run opens to others: local clusters listen on loopback only, a TLS scheduler runs predict
to the same bytes and refuses clients without the certificate, and --listen is an explicit opt-in."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_predict import read, tissue, write_volume

from cleftchunk.errors import CleftchunkError
from cleftchunk.run.cluster import check_listen, is_loopback

# servers, clusters and subprocesses: part of the full suite, not of the quick loop
pytestmark = pytest.mark.slow


# -- helpers --------------------------------------------------------------------------------------
AUDIT = Path(__file__).parent / "bind_audit"  # its sitecustomize records every socket.bind


def bound_addresses(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, list[tuple[int, str, int]]]:
    """Run ``cleftchunk args...`` in a new process; return it and every (pid, host, port) a socket
    of it or of a process it started was bound to."""
    log = tmp_path / f"binds-{len(list(tmp_path.glob('binds-*')))}.txt"
    env = dict(os.environ, CLEFTCHUNK_TEST_BIND_LOG=str(log),
               PYTHONPATH=os.pathsep.join([str(AUDIT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.run([sys.executable, "-c", "from cleftchunk_cli.main import main; main()", *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=300)
    lines = log.read_text().splitlines() if log.exists() else []
    return proc, [(int(pid), host, int(port)) for pid, host, port in (line.split() for line in lines)]


def self_signed(tmp_path, name="cluster"):
    """A self-signed certificate for 127.0.0.1 that is its own CA: (ca, cert, key) file paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, cert_file, key_file


@pytest.fixture
def checkpoint(tmp_path):
    from cleftchunk.model import arch_spec, build_model, save_checkpoint

    torch.manual_seed(0)
    net = build_model("unetv0", preset="small")
    return save_checkpoint(tmp_path / "small.pth", net, arch_spec(net), (4, 32, 32))


# -- loopback by default ---------------------------------------------------------------------------
def test_a_local_predict_with_worker_processes_listens_on_loopback_only(tmp_path, run_cli, checkpoint):
    raw = tissue((8, 48, 48), seed=4)
    spec = write_volume(tmp_path / "in.zarr" / "raw", raw)
    out = str(tmp_path / "out.zarr" / "pred")
    common = ("--checkpoint", checkpoint, "--chunks", "4,16,16", "--block-shape", "4,16,16", "--no-progress")
    proc, binds = bound_addresses(tmp_path, "predict", spec, out, *common, "--workers", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # scheduler, its dashboard, 2 nannies and 2 workers (each with an HTTP server) at least
    assert len(binds) >= 5 and len({pid for pid, _, _ in binds}) >= 3, binds
    assert all(is_loopback(host) for _, host, _ in binds), binds
    run_cli("predict", spec, tmp_path / "local.zarr/pred", *common, "--workers", "0")
    np.testing.assert_array_equal(read(out), read(tmp_path / "local.zarr/pred"))


def test_listen_opts_in_to_another_interface(tmp_path, run_cli, checkpoint):
    """127.0.0.2 is another loopback address: a run binds it, and nothing else, when asked."""
    spec = write_volume(tmp_path / "in.zarr" / "raw", tissue((4, 32, 32)), chunks=(2, 32, 32))
    base = ("predict", spec, "--checkpoint", checkpoint, "--workers", "1", "--chunks", "2,32,32", "--no-progress")
    proc, binds = bound_addresses(tmp_path, *base[:2], tmp_path / "a.zarr/pred", *base[2:], "--listen", "127.0.0.2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "warning" not in proc.stderr + proc.stdout  # loopback: no warning
    assert binds and {host for _, host, _ in binds} == {"127.0.0.2"}, binds
    local = run_cli(*base[:2], tmp_path / "b.zarr/pred", *base[2:], "--workers", "0")
    assert local.exit_code == 0
    np.testing.assert_array_equal(read(tmp_path / "a.zarr/pred"), read(tmp_path / "b.zarr/pred"))


def test_listen_beyond_loopback_warns_and_malformed_addresses_are_refused(run_cli, tmp_path):
    warnings = []
    assert check_listen("0.0.0.0", warnings.append) == "0.0.0.0"
    assert len(warnings) == 1 and "anyone who can reach it can run code as you" in warnings[0]
    assert check_listen("localhost", warnings.append) == "localhost" and len(warnings) == 1
    assert is_loopback("::1") and is_loopback("127.0.0.1") and not is_loopback("192.0.2.1")
    for bad in ("tcp://127.0.0.1", "127.0.0.1:8786", ""):
        with pytest.raises(CleftchunkError, match="must be a host name or IP address"):
            check_listen(bad, warnings.append)
    result = run_cli("predict", "a.zarr/raw", "b.zarr/pred", "-pm", tmp_path / "x.pth", "--tls-cert", "c.pem", expect=2)
    assert "use them with --scheduler tls://" in result.output


# -- TLS between machines -------------------------------------------------------------------------
@pytest.fixture
def tls_cluster(tmp_path):
    from distributed import LocalCluster, Security

    ca, cert, key = self_signed(tmp_path)
    security = Security(
        tls_ca_file=str(ca), tls_scheduler_cert=str(cert), tls_scheduler_key=str(key),
        tls_worker_cert=str(cert), tls_worker_key=str(key), tls_client_cert=str(cert), tls_client_key=str(key),
        require_encryption=True,
    )
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, protocol="tls://", host="127.0.0.1", security=security,
        dashboard_address="127.0.0.1:0", worker_dashboard_address="127.0.0.1:0",
    ) as cluster:
        yield cluster.scheduler_address, (ca, cert, key)


def test_a_tls_scheduler_runs_predict_to_the_same_bytes(tmp_path, run_cli, checkpoint, tls_cluster):
    address, (ca, cert, key) = tls_cluster
    assert address.startswith("tls://127.0.0.1:")
    raw = tissue((6, 40, 40), seed=6)
    spec = write_volume(tmp_path / "in.zarr" / "raw", raw, chunks=(2, 32, 32))
    common = ("--checkpoint", checkpoint, "--chunks", "2,32,32", "--no-progress")
    run_cli("predict", spec, tmp_path / "tls.zarr/pred", *common, "--scheduler", address, "--tls-ca-file", ca, "--tls-cert", cert, "--tls-key", key)
    run_cli("predict", spec, tmp_path / "local.zarr/pred", *common, "--workers", "0")
    np.testing.assert_array_equal(read(tmp_path / "tls.zarr/pred"), read(tmp_path / "local.zarr/pred"))


def test_a_tls_scheduler_refuses_clients_without_its_certificate(tmp_path, run_cli, checkpoint, tls_cluster):
    from distributed import Client, Security

    address, _ = tls_cluster
    plain = address.replace("tls://", "tcp://")
    with pytest.raises(Exception):
        Client(plain, timeout="3s")
    with pytest.raises(Exception):  # a certificate from another authority
        Client(address, security=Security.temporary(), timeout="3s")
    # the command line names the missing options instead of trying without them
    spec = write_volume(tmp_path / "in.zarr" / "raw", tissue((4, 32, 32)), chunks=(2, 32, 32))
    result = run_cli("predict", spec, tmp_path / "o.zarr/pred", "-pm", checkpoint, "--scheduler", address, expect=2)
    assert "uses TLS: give --tls-ca-file, --tls-cert and --tls-key" in result.output and result.output.count("\n") == 1
    result = run_cli("predict", spec, tmp_path / "o.zarr/pred", "-pm", checkpoint, "--scheduler", plain, expect=2)
    assert result.output.startswith("error: ") and "unexpected" not in result.output


def test_tls_options_are_checked_before_connecting(tmp_path):
    from cleftchunk.run.cluster import tls_security

    ca, cert, key = self_signed(tmp_path)
    with pytest.raises(CleftchunkError, match="needs all of --tls-ca-file, --tls-cert and --tls-key"):
        tls_security(str(ca), str(cert), None)
    with pytest.raises(CleftchunkError, match="does not exist"):
        tls_security(str(ca), str(cert), str(tmp_path / "missing.key"))
    security = tls_security(str(ca), str(cert), str(key))
    assert security.require_encryption and security.tls_ca_file == str(ca)
