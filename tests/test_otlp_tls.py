"""TLS to the collector: OTLP/HTTP over HTTPS with a CA bundle, OTLP/gRPC over TLS with mutual
TLS, and a collector whose certificate the configured CA did not sign — which must fail as a
counted export error (never a crash, never a silent loss). Certificates are generated per test
with openssl."""
import ssl
import subprocess
import threading
from concurrent import futures

import grpc
import pytest

from harness import Envoy, curl, free_port, hcm_listener, our_otlp_logger, poll_until
from otlp_receiver import OtlpReceiver

OK = {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def pki(tmp_path):
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and an
    unrelated CA."""
    d = tmp_path / "pki"
    d.mkdir()
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
                "-days", "2", "-subj", f"/CN={ca}", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    # Any extension makes an X.509 v3 certificate; rustls (like browsers) rejects v1.
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, ext in (("server", ["-extfile", "san.ext"]), ("client", ["-extfile", "client.ext"])):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", *ext, cwd=d)
    return d


def logger_envoy(tmp_path, cfg):
    port = free_port()
    cfg = dict({"body": "%REQ(:PATH)%", "flush_interval_ms": 200,
                "retry": {"initial_backoff_ms": 50, "max_backoff_ms": 100, "max_elapsed_ms": 500}}, **cfg)
    return Envoy(tmp_path, {"listeners": [hcm_listener("front", port, [OK], access_log=[our_otlp_logger(cfg)])]}), port


def stats(e):
    return {k.removeprefix("obs.access_log.otlp."): v for k, v in e.stats("obs.access_log.otlp").items()}


def test_https_with_a_ca_bundle(tmp_path, pki):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "server.pem", pki / "server.key")
    with OtlpReceiver("http", tls=ctx) as rx:
        assert rx.endpoint.startswith("https://")
        e, port = logger_envoy(tmp_path, {"endpoint": rx.endpoint, "protocol": "http/protobuf",
                                          "tls": {"ca_file": str(pki / "ca.pem")}})
        with e:
            for i in range(3):
                curl(f"http://127.0.0.1:{port}/tls{i}")
            recs = rx.wait_for(3)
        assert sorted(r["body"] for r in recs) == ["/tls0", "/tls1", "/tls2"]


class _Counter:
    def __init__(self):
        self.n, self.peers, self.lock = 0, [], threading.Lock()

    def export(self, request, context):
        with self.lock:
            self.n += 1
            self.peers.append(context.auth_context().get("x509_common_name"))
        return b""


def grpc_tls_server(pki, require_client_cert: bool):
    counter = _Counter()
    handler = grpc.unary_unary_rpc_method_handler(counter.export, request_deserializer=None, response_serializer=None)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.logs.v1.LogsService", {"Export": handler})])
    creds = grpc.ssl_server_credentials([((pki / "server.key").read_bytes(), (pki / "server.pem").read_bytes())],
                                        root_certificates=(pki / "ca.pem").read_bytes(),
                                        require_client_auth=require_client_cert)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    return server, port, counter


def test_grpc_with_mutual_tls(tmp_path, pki):
    server, gport, counter = grpc_tls_server(pki, require_client_cert=True)
    try:
        e, port = logger_envoy(tmp_path, {"endpoint": f"https://127.0.0.1:{gport}", "tls": {
            "ca_file": str(pki / "ca.pem"), "cert_file": str(pki / "client.pem"), "key_file": str(pki / "client.key"),
            "server_name": "localhost"}})
        with e:
            curl(f"http://127.0.0.1:{port}/mtls")
            poll_until(lambda: counter.n >= 1, timeout=10, what="an export over mTLS")
            poll_until(lambda: stats(e)["records_exported"] == 1, timeout=5, what="counted exported")
        assert counter.peers[0] == [b"client"], "the collector saw our client certificate"
    finally:
        server.stop(0)


def test_a_collector_the_ca_did_not_sign_fails_counted(tmp_path, pki):
    server, gport, counter = grpc_tls_server(pki, require_client_cert=False)
    try:
        e, port = logger_envoy(tmp_path, {"endpoint": f"https://127.0.0.1:{gport}",
                                          "tls": {"ca_file": str(pki / "other-ca.pem")}})
        with e:
            for _ in range(3):
                curl(f"http://127.0.0.1:{port}/x")
            s = poll_until(lambda: (st := stats(e))["records_failed"] == 3 and st, timeout=15, what="failed counted")
            assert curl(f"http://127.0.0.1:{port}/x").stdout == "200", "Envoy keeps serving"
            log = e.log()
        assert counter.n == 0 and s["records_exported"] == 0 and s["export_failures"] >= 1
        assert "failed" in log and ("certificate" in log.lower() or "tls" in log.lower() or "invalid peer" in log.lower()), \
            log[-2000:]
    finally:
        server.stop(0)


@pytest.mark.parametrize("cfg,needle", [
    ({"endpoint": "http://127.0.0.1:4317", "tls": {}}, "field `tls`: needs an https:// endpoint"),
    ({"endpoint": "https://127.0.0.1:4317", "tls": {"ca_file": "/nonexistent.pem"}}, "field `tls.ca_file`"),
    ({"endpoint": "https://127.0.0.1:4317", "tls": {"cert_file": "/etc/hostname"}}, "field `tls.key_file`"),
])
def test_bad_tls_config_is_rejected(tmp_path, cfg, needle):
    e, _ = logger_envoy(tmp_path, cfg)
    p = e.run_to_exit()
    assert p.returncode == 1 and needle in e.log(), e.log()[-2000:]
