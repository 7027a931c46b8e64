"""TLS operators: the built-in file logger and ours on the same mutual-TLS listener must log
the same TLS facts (version, cipher, session id, peer/local subjects, SANs, fingerprints,
serial, validity, SNI)."""
import subprocess

from harness import (Envoy, direct_response_listener, free_port, hcm_listener, paired_loggers, records_by_id, route,
                     static_cluster, wait_lines)

TLS_FORMAT = {
    "request_id": "%REQ(X-REQUEST-ID)%",
    "version": "%DOWNSTREAM_TLS_VERSION%",
    "cipher": "%DOWNSTREAM_TLS_CIPHER%",
    "session": "%DOWNSTREAM_TLS_SESSION_ID%",
    "peer_subject": "%DOWNSTREAM_PEER_SUBJECT%",
    "peer_issuer": "%DOWNSTREAM_PEER_ISSUER%",
    "peer_serial": "%DOWNSTREAM_PEER_SERIAL%",
    "peer_sha256": "%DOWNSTREAM_PEER_FINGERPRINT_256%",
    "peer_sha1": "%DOWNSTREAM_PEER_FINGERPRINT_1%",
    "peer_uri_san": "%DOWNSTREAM_PEER_URI_SAN%",
    "peer_dns_san": "%DOWNSTREAM_PEER_DNS_SAN%",
    "peer_start": "%DOWNSTREAM_PEER_CERT_V_START%",
    "peer_end": "%DOWNSTREAM_PEER_CERT_V_END%",
    "local_subject": "%DOWNSTREAM_LOCAL_SUBJECT%",
    "local_uri_san": "%DOWNSTREAM_LOCAL_URI_SAN%",
    "local_dns_san": "%DOWNSTREAM_LOCAL_DNS_SAN%",
    "sni": "%REQUESTED_SERVER_NAME%",
    "ja3": "%TLS_JA3_FINGERPRINT%",
    "ja4": "%TLS_JA4_FINGERPRINT%",
    "mixed": "%DOWNSTREAM_TLS_VERSION% via %REQUESTED_SERVER_NAME%",
    "handshake": "%DOWNSTREAM_HANDSHAKE_DURATION%",
}


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d):
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/O=envoy-obs test/CN=test CA", cwd=d)
    for name, san in (("server", "DNS:localhost,URI:spiffe://obs/server"),
                      ("client", "DNS:client.local,URI:spiffe://obs/client")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/O=envoy-obs test/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=d)


def mtls_server(d) -> dict:
    """A listener transport socket: server.pem, client certificate required (signed by ca.pem)."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": {
                "tls_certificates": [{"certificate_chain": {"filename": str(d / "server.pem")},
                                      "private_key": {"filename": str(d / "server.key")}}],
                "validation_context": {"trusted_ca": {"filename": str(d / "ca.pem")}}}}}


def test_tls_operators_match_builtin(tmp_path):
    make_pki(tmp_path)
    front, up = free_port(), free_port()
    logs, builtin, ours = paired_loggers(tmp_path, TLS_FORMAT)
    listener = hcm_listener("front", front, [route("/", "backend")], access_log=logs)
    listener["filter_chains"][0]["transport_socket"] = mtls_server(tmp_path)
    listener["listener_filters"] = [{"name": "envoy.filters.listener.tls_inspector", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector",
        "enable_ja3_fingerprinting": True, "enable_ja4_fingerprinting": True}}]
    res = {"listeners": [listener, direct_response_listener("up", up)], "clusters": [static_cluster("backend", up)]}
    with Envoy(tmp_path, res) as e:
        for extra in ([], ["--http2"], ["--tls-max", "1.2"]):
            out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10",
                                  "--cacert", str(tmp_path / "ca.pem"), "--cert", str(tmp_path / "client.pem"),
                                  "--key", str(tmp_path / "client.key"), "--resolve", f"localhost:{front}:127.0.0.1",
                                  *extra, f"https://localhost:{front}/ok"], capture_output=True, text=True)
            assert out.stdout == "200", out
        wait_lines(3, builtin, ours)
        e.quit()
    a, b = records_by_id(builtin), records_by_id(ours)
    assert a.keys() == b.keys() and len(a) == 3
    for rid in a:
        assert a[rid] == b[rid], (a[rid], b[rid])
    rec = next(iter(a.values()))
    assert rec["peer_uri_san"] == "spiffe://obs/client" and rec["sni"] == "localhost"
    assert rec["peer_subject"] and rec["local_uri_san"] == "spiffe://obs/server" and rec["ja3"] and rec["ja4"]
    assert {r["version"] for r in a.values()} == {"TLSv1.3", "TLSv1.2"}


UPSTREAM_TLS_FORMAT = {
    "request_id": "%REQ(X-REQUEST-ID)%",
    "version": "%UPSTREAM_TLS_VERSION%",
    "cipher": "%UPSTREAM_TLS_CIPHER%",
    "session": "%UPSTREAM_TLS_SESSION_ID%",
    "peer_subject": "%UPSTREAM_PEER_SUBJECT%",
    "peer_issuer": "%UPSTREAM_PEER_ISSUER%",
    "peer_uri_san": "%UPSTREAM_PEER_URI_SAN%",
    "peer_dns_san": "%UPSTREAM_PEER_DNS_SAN%",
    "peer_start": "%UPSTREAM_PEER_CERT_V_START%",
    "peer_end": "%UPSTREAM_PEER_CERT_V_END%",
    "local_uri_san": "%UPSTREAM_LOCAL_URI_SAN%",
    "local_dns_san": "%UPSTREAM_LOCAL_DNS_SAN%",
    "failure": "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    "code": "%RESPONSE_CODE%",
}


def test_upstream_tls_operators_match_builtin(tmp_path):
    make_pki(tmp_path)
    front, up = free_port(), free_port()
    logs, builtin, ours = paired_loggers(tmp_path, UPSTREAM_TLS_FORMAT)
    upstream = direct_response_listener("up", up)
    upstream["filter_chains"][0]["transport_socket"] = mtls_server(tmp_path)
    cluster = static_cluster("backend", up)
    cluster["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": "localhost",
            "common_tls_context": {
                "tls_certificates": [{"certificate_chain": {"filename": str(tmp_path / "client.pem")},
                                      "private_key": {"filename": str(tmp_path / "client.key")}}],
                "validation_context": {"trusted_ca": {"filename": str(tmp_path / "ca.pem")}}}}}
    res = {"listeners": [hcm_listener("front", front, [route("/", "backend")], access_log=logs), upstream],
           "clusters": [cluster]}
    with Envoy(tmp_path, res) as e:
        for _ in range(2):
            out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10",
                                  f"http://127.0.0.1:{front}/ok"], capture_output=True, text=True)
            assert out.stdout == "200", out
        wait_lines(2, builtin, ours)
        e.quit()
    a, b = records_by_id(builtin), records_by_id(ours)
    assert a == b
    rec = next(iter(a.values()))
    assert rec["peer_uri_san"] == "spiffe://obs/server" and rec["local_uri_san"] == "spiffe://obs/client"
