"""The built-in ``http_get`` against a real local HTTP server."""

from __future__ import annotations

import datetime
import gzip
import json
import socket
import ssl
import threading
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from agentsite import outbound
from tests.support.processes import LOOPBACK_NETWORKS
from tools import http as http_tool
from tools.http import HttpGetArgs, _same_host_redirect, http_get
from tools.registry import (
    ToolArgumentsInvalid,
    ToolContext,
    ToolError,
    TransientToolError,
    registry,
)

LARGE_TOTAL = 50 * 1024 * 1024
CHUNK = b"x" * 65536
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
BOMB_SIZE = 20_000_000
GZIP_BOMB = gzip.compress(b"a" * BOMB_SIZE)  # about 20 kB


def ctx(hosts: list[str] | None = None, **constraints: Any) -> ToolContext:
    if hosts is not None:
        constraints = {"url": {"hosts": hosts}}
    return ToolContext(
        run_id="r",
        step_index=1,
        idempotency_key="r:1",
        attempt=1,
        tool="http_get",
        constraints=constraints,
    )


# The test servers listen on random ports of 127.0.0.1, a loopback address (see `loopback`).
CTX = ctx(["127.0.0.1:*"])


@pytest.fixture(autouse=True)
def loopback(settings):
    settings.AGENTSITE_OUTBOUND_ALLOWED_NETWORKS = LOOPBACK_NETWORKS


@dataclass
class Site:
    port: int
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    large_done: threading.Event = field(default_factory=threading.Event)
    large_written: int = 0

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def paths(self) -> list[str]:
        return [path for _, path, _ in self.requests]


class Handler(BaseHTTPRequestHandler):
    server: Any  # the ThreadingHTTPServer below, with a ``site`` attribute

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", content_type: str = "text/plain", **headers):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str, status: int = 302, **headers: str) -> None:
        self._send(status, b"", Location=location, **headers)

    def do_GET(self) -> None:
        site: Site = self.server.site
        site.requests.append((self.command, self.path, dict(self.headers.items())))
        path = self.path
        other_host = f"http://localhost:{site.port}"
        if path == "/text":
            self._send(200, "héllo wörld ✓".encode(), "text/plain; charset=utf-8")
        elif path == "/json":
            self._send(200, b'{"ok": true, "items": [1, 2, 3]}', "application/json")
        elif path == "/latin1":
            self._send(200, "café".encode("latin-1"), "text/html; charset=ISO-8859-1")
        elif path == "/badcharset":
            self._send(200, b"ok \xff", "text/plain; charset=no-such-charset")
        elif path == "/no-type-binary":
            self.send_response(200)
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"a\x00b\x00")
        elif path == "/accents":
            self._send(200, "é".encode() * 1000, "text/plain; charset=utf-8")
        elif path == "/binary":
            self._send(200, PNG, "image/png")
        elif path == "/large":
            self._large(site)
        elif path == "/gzip-small":
            self._send(200, gzip.compress(b"a" * 10), "text/plain", Content_Encoding="gzip")
        elif path == "/gzip-bomb":
            self._send(200, GZIP_BOMB, "text/plain", Content_Encoding="gzip")
        elif path == "/brotli":
            self._send(200, b"\x0b\x02\x80hi\x03", "text/plain", Content_Encoding="br")
        elif path == "/echo":
            self._send(200, json.dumps(dict(self.headers.items())).encode(), "application/json")
        elif path == "/redirect":
            self._redirect("/text")
        elif path == "/redirect-absolute":
            self._redirect(f"http://127.0.0.1:{site.port}/json", 301)
        elif path == "/redirect-other-host":
            self._redirect(f"{other_host}/text")
        elif path == "/redirect-credentials":
            self._redirect(f"http://agent:hunter2@127.0.0.1:{site.port}/text")
        elif path == "/redirect-ftp":
            self._redirect(f"ftp://127.0.0.1:{site.port}/file")
        elif path == "/redirect-cookie":
            self._redirect("/echo", Set_Cookie="session=s3cret; Path=/")
        elif path.startswith("/to-port/"):
            self._redirect(f"http://127.0.0.1:{path.rpartition('/')[2]}/text")
        elif path == "/redirect-no-location":
            self._send(302)
        elif path == "/loop":
            self._redirect("/loop")
        elif path.startswith("/chain/"):
            left = int(path.rpartition("/")[2])
            self._redirect(f"/chain/{left - 1}", 307) if left else self._send(200, b"end")
        elif path == "/missing":
            self._send(404, b"no such page")
        elif path == "/unavailable":
            self._send(503, b"down for maintenance", Retry_After="7")
        elif path == "/busy":
            self._send(429, b"slow down")
        elif path == "/slow":
            site.release.wait(10)  # the slow endpoint: answers only when the test ends
            self._send(200, b"too late")
        elif path == "/drip":
            self._drip(site)
        else:
            self._send(500, b"unknown test path")

    def _large(self, site: Site) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(LARGE_TOTAL))
        self.end_headers()
        try:
            while site.large_written < LARGE_TOTAL:
                self.wfile.write(CHUNK)
                site.large_written += len(CHUNK)
        except OSError:  # the client hung up
            pass
        finally:
            site.large_done.set()

    def _drip(self, site: Site) -> None:
        # Headers at once, then a byte every 50 ms for 3 s: no single read ever times out.
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        try:
            for _ in range(60):
                if site.release.wait(0.05):
                    break
                self.wfile.write(b".")
                self.wfile.flush()
        except OSError:
            pass


@pytest.fixture
def site() -> Iterator[Site]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.site = Site(port=server.server_address[1])  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server.site  # type: ignore[attr-defined]
    finally:
        server.site.release.set()  # type: ignore[attr-defined]
        server.shutdown()
        server.server_close()
        thread.join(5)


def fetch(url: str, context: ToolContext = CTX, **args: Any) -> dict[str, Any]:
    return http_get(HttpGetArgs(url=url, **args), context)


def fetch_error(url: str, context: ToolContext = CTX, **args: Any) -> ToolError:
    with pytest.raises(ToolError) as info:
        fetch(url, context, **args)
    return info.value


# --- successful fetches ------------------------------------------------------------------------


def test_text_page(site):
    result = fetch(site.url("/text"))
    assert result == {
        "url": site.url("/text"),
        "status": 200,
        "content_type": "text/plain; charset=utf-8",
        "text": "héllo wörld ✓",
        "truncated": False,
        "bytes": len("héllo wörld ✓".encode()),
    }
    assert [(method, path) for method, path, _ in site.requests] == [("GET", "/text")]


def test_json_page(site):
    result = fetch(site.url("/json"))
    assert result["status"] == 200 and result["content_type"] == "application/json"
    assert json.loads(result["text"]) == {"ok": True, "items": [1, 2, 3]}
    assert result["truncated"] is False


def test_charset_from_headers(site):
    assert fetch(site.url("/latin1"))["text"] == "café"


def test_unknown_charset_falls_back_to_utf8_with_replacement(site):
    assert fetch(site.url("/badcharset"))["text"] == "ok \ufffd"


def test_binary_content_is_not_returned_as_text(site):
    result = fetch(site.url("/binary"))
    assert result["text"] is None
    assert result["content_type"] == "image/png"
    assert result["bytes"] == len(PNG) and result["truncated"] is False
    assert "binary content (image/png)" in result["note"]


def test_body_without_content_type_that_looks_binary_is_not_returned(site):
    result = fetch(site.url("/no-type-binary"))
    assert result["text"] is None and "note" in result and result["bytes"] == 4


def test_headers_sent_user_agent_and_no_cookies(site):
    result = fetch(site.url("/redirect-cookie"))  # sets a cookie, then redirects to /echo
    assert result["url"] == site.url("/echo")
    sent = {name.lower(): value for name, value in json.loads(result["text"]).items()}
    assert sent["user-agent"] == "agentsite-http-get/1"
    assert sent["accept-encoding"] == "identity"
    assert "cookie" not in sent
    assert [method for method, _, _ in site.requests] == ["GET", "GET"]


# --- size limit --------------------------------------------------------------------------------


def test_large_body_is_truncated_at_the_limit_and_not_downloaded(site, settings):
    settings.AGENTSITE_HTTP_GET_MAX_BYTES = 1000
    result = fetch(site.url("/large"))
    assert result["truncated"] is True
    assert result["bytes"] == 1000
    assert result["text"] == "x" * 1000
    # The connection was dropped early: the server could not send the whole 50 MB body.
    assert site.large_done.wait(10)
    assert site.large_written < LARGE_TOTAL


def test_max_bytes_argument_is_capped_by_the_server_limit(site, settings):
    settings.AGENTSITE_HTTP_GET_MAX_BYTES = 1000
    small = fetch(site.url("/accents"), max_bytes=11)
    assert small["truncated"] is True and small["bytes"] == 11
    assert small["text"] == "é" * 5  # the character cut in half is dropped, not mangled
    capped = fetch(site.url("/accents"), max_bytes=10**9)
    assert capped["bytes"] == 1000 and capped["truncated"] is True
    assert capped["text"] == "é" * 500


def test_body_exactly_at_the_limit_is_not_truncated(site, settings):
    settings.AGENTSITE_HTTP_GET_MAX_BYTES = 2000
    result = fetch(site.url("/accents"))
    assert result["truncated"] is False and result["bytes"] == 2000
    assert result["text"] == "é" * 1000


def test_gzip_body_is_decompressed_within_the_limit(site, settings):
    settings.AGENTSITE_HTTP_GET_MAX_BYTES = 1000
    small = fetch(site.url("/gzip-small"))
    assert small["text"] == "a" * 10 and small["truncated"] is False
    tracemalloc.start()
    try:
        bomb = fetch(site.url("/gzip-bomb"))  # 20 kB on the wire, 20 MB decompressed
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert bomb["truncated"] is True and bomb["bytes"] == 1000 and bomb["text"] == "a" * 1000
    assert peak < BOMB_SIZE // 10  # never decompressed as a whole


def test_unsupported_content_encoding_is_refused(site):
    err = fetch_error(site.url("/brotli"))
    assert "'br'" in str(err) and not isinstance(err, TransientToolError)


# --- redirects ---------------------------------------------------------------------------------


def test_redirect_on_the_same_host_is_followed(site):
    result = fetch(site.url("/redirect"))
    assert result["url"] == site.url("/text")
    assert result["text"] == "héllo wörld ✓"
    assert site.paths() == ["/redirect", "/text"]
    assert fetch(site.url("/redirect-absolute"))["url"] == site.url("/json")


def test_redirect_to_another_host_is_not_followed(site):
    # localhost and 127.0.0.1 are different host names, even though both reach this server;
    # the redirect is refused even when both are on the allowlist.
    for context in (CTX, ctx(["127.0.0.1:*", "localhost:*"])):
        err = fetch_error(site.url("/redirect-other-host"), context)
        assert not isinstance(err, TransientToolError)
        assert "another host, 'localhost'" in str(err)
        assert site.url("/text", host="localhost") in str(err)
    assert site.paths() == ["/redirect-other-host", "/redirect-other-host"]


def test_redirect_loop_stops_after_max_redirects(site, settings):
    settings.AGENTSITE_HTTP_GET_MAX_REDIRECTS = 2
    err = fetch_error(site.url("/loop"))
    assert "too many redirects" in str(err) and "at most 2" in str(err)
    assert not isinstance(err, TransientToolError)
    assert site.paths() == ["/loop"] * 3  # the request, then two redirects followed


def test_max_redirects_are_followed(site, settings):
    settings.AGENTSITE_HTTP_GET_MAX_REDIRECTS = 2
    result = fetch(site.url("/chain/2"))
    assert result["url"] == site.url("/chain/0") and result["text"] == "end"
    assert "too many redirects" in str(fetch_error(site.url("/chain/3")))


def test_redirect_with_credentials_is_refused_without_echoing_them(site):
    err = fetch_error(site.url("/redirect-credentials"))
    assert "user name or password" in str(err)
    assert "hunter2" not in str(err) and "agent:" not in str(err)
    assert site.paths() == ["/redirect-credentials"]


def test_redirect_to_another_scheme_or_without_location_is_refused(site):
    assert "only http:// and https://" in str(fetch_error(site.url("/redirect-ftp")))
    assert "without a Location" in str(fetch_error(site.url("/redirect-no-location")))


@pytest.mark.parametrize(
    ("current", "location", "expected"),
    [
        ("http://a.example/x", "https://a.example/y", "https://a.example/y"),
        ("http://a.example/x/y", "../z?q=1", "http://a.example/z?q=1"),
        ("https://a.example/x", "//A.EXAMPLE:8443/y", "https://A.EXAMPLE:8443/y"),
    ],
)
def test_same_host_redirect_targets(current, location, expected):
    assert _same_host_redirect(current, location) == expected


@pytest.mark.parametrize(
    ("current", "location", "message"),
    [
        ("https://a.example/x", "http://a.example/y", "from https to plain http"),
        ("https://a.example/x", "https://b.example/y", "another host, 'b.example'"),
        ("https://a.example/x", "https://sub.a.example/y", "another host, 'sub.a.example'"),
    ],
)
def test_refused_redirect_targets(current, location, message):
    with pytest.raises(ToolError, match=message):
        _same_host_redirect(current, location)


# --- allowlist ---------------------------------------------------------------------------------


@pytest.mark.parametrize("constraints", [{}, {"url": {"max_length": 500}}, {"url": {"hosts": []}}])
def test_without_a_hosts_allowlist_every_url_is_refused(site, constraints):
    err = fetch_error(site.url("/text"), ctx(**constraints))
    assert "http_get needs a hosts allowlist on its grant" in str(err)
    assert site.requests == []


def test_host_not_on_the_allowlist_is_refused(site):
    err = fetch_error(site.url("/text"), ctx(["docs.example.com", "*.example.org"]))
    assert "'127.0.0.1' is not allowed" in str(err)
    assert not isinstance(err, TransientToolError)
    assert site.requests == []


def test_a_port_not_on_the_allowlist_is_refused(site):
    # A host without a port allows only the scheme's default port (80 for http).
    err = fetch_error(site.url("/text"), ctx(["127.0.0.1"]))
    assert f"port {site.port} of host '127.0.0.1' is not allowed for this agent" in str(err)
    assert not isinstance(err, TransientToolError)
    assert "'127.0.0.1:*' is not" not in str(err)
    assert site.requests == []
    assert fetch(site.url("/text"), ctx([f"127.0.0.1:{site.port}"]))["status"] == 200
    assert fetch(site.url("/text"), ctx([f"127.0.0.1:{site.port + 1}", "127.0.0.1:*"]))["status"]


def test_a_redirect_to_another_port_must_be_allowed_too(site):
    # Same host, another port: followed only when the allowlist names that port as well.
    here = f"127.0.0.1:{site.port}"
    err = fetch_error(site.url(f"/to-port/{site.port + 1}"), ctx([here]))
    assert f"port {site.port + 1} of host '127.0.0.1' is not allowed" in str(err)
    assert site.paths() == [f"/to-port/{site.port + 1}"]


def test_url_with_credentials_is_refused_even_without_validation(site):
    args = HttpGetArgs.model_construct(url=site.url("/text", host="bot:hunter2@127.0.0.1"))
    with pytest.raises(ToolError) as info:
        http_get(args, CTX)
    assert "user name or password" in str(info.value) and "hunter2" not in str(info.value)
    assert site.requests == []


# --- addresses: resolved once, checked, connected to ---------------------------------------------


def test_loopback_is_refused_unless_its_network_is_allowed(site, settings):
    settings.AGENTSITE_OUTBOUND_ALLOWED_NETWORKS = []
    err = fetch_error(site.url("/text"))
    assert str(err) == (
        f"cannot fetch {site.url('/text')}: 127.0.0.1 is a loopback address, which may not be "
        "contacted; http_get fetches public addresses only"
    )
    assert type(err) is ToolError
    assert site.requests == []


@pytest.mark.parametrize(
    ("addresses", "words"),
    [
        (["10.1.2.3"], "'intranet.example.com' resolves to 10.1.2.3, a private address"),
        (["169.254.169.254"], "resolves to 169.254.169.254, a link-local address"),
        # One public address is not enough: every address the name has must be public.
        (["93.184.215.14", "127.0.0.1"], "resolves to 127.0.0.1, a loopback address"),
        (["::ffff:127.0.0.1"], "a loopback address"),
    ],
)
def test_a_name_resolving_to_a_non_public_address_is_refused(
    site, settings, fake_dns, addresses, words
):
    settings.AGENTSITE_OUTBOUND_ALLOWED_NETWORKS = []
    fake_dns["intranet.example.com"] = addresses
    err = fetch_error(site.url("/text", host="intranet.example.com"), ctx(["*.example.com:*"]))
    assert words in str(err) and type(err) is ToolError
    assert site.requests == []


def test_the_connection_goes_to_the_checked_address_with_the_name_as_host(site, fake_dns):
    # "pinned.test" exists only in the test's resolver: the fetch works only if http_get
    # connects to the address it checked instead of resolving the name a second time.
    fake_dns["pinned.test"] = ["127.0.0.1"]
    result = fetch(site.url("/echo", host="pinned.test"), ctx(["pinned.test:*"]))
    assert result["url"] == site.url("/echo", host="pinned.test")
    sent = {name.lower(): value for name, value in json.loads(result["text"]).items()}
    assert sent["host"] == f"pinned.test:{site.port}"


def test_every_redirect_hop_is_resolved_and_checked_again(site, settings, monkeypatch):
    # The name rebinds between the first request and the redirect it answers.
    answers = iter([["127.0.0.1"], ["10.9.8.7"]])
    monkeypatch.setattr(outbound, "resolver", lambda host, port: next(answers))
    err = fetch_error(site.url("/redirect", host="rebind.test"), ctx(["rebind.test:*"]))
    assert "'rebind.test' resolves to 10.9.8.7, a private address" in str(err)
    assert site.paths() == ["/redirect"]


def test_a_name_that_does_not_exist_is_a_permanent_error(site, fake_dns):
    err = fetch_error(site.url("/text", host="nxdomain.test"), ctx(["nxdomain.test:*"]))
    assert type(err) is ToolError
    assert "'nxdomain.test' does not resolve to an address" in str(err)


def test_a_failing_dns_server_is_a_transient_error(site, monkeypatch):
    def failing(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(outbound, "resolver", failing)
    with pytest.raises(TransientToolError, match="could not resolve 'flaky.test'"):
        fetch(site.url("/text", host="flaky.test"), ctx(["flaky.test:*"]))


def _certificate_authority(directory: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA certificate, and a certificate and key for ``name`` signed by it (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def build(subject: str, key, issuer: str, issuer_key, *, ca: bool):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                critical=False,
            )
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),  # fmt: skip
                critical=True,
            )
        else:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False
            ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, leaf_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca_cert = build("Agentsite test CA", ca_key, "Agentsite test CA", ca_key, ca=True)
    leaf = build(name, leaf_key, "Agentsite test CA", ca_key, ca=False)
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@pytest.fixture
def tls_site(tmp_path, monkeypatch) -> Iterator[Site]:
    """The test site over HTTPS with a certificate for tls.test, which SSL_CERT_FILE trusts."""
    ca, cert, key = _certificate_authority(tmp_path, "tls.test")
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.site = Site(port=server.server_address[1])  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server.site  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_https_to_the_checked_address_verifies_the_certificate_for_the_name(tls_site, fake_dns):
    # Connected to 127.0.0.1, TLS still sends and verifies the name (SNI, certificate).
    fake_dns["tls.test"] = ["127.0.0.1"]
    url = f"https://tls.test:{tls_site.port}/echo"
    result = fetch(url, ctx(["tls.test:*"]))
    sent = {name.lower(): value for name, value in json.loads(result["text"]).items()}
    assert result["url"] == url and sent["host"] == f"tls.test:{tls_site.port}"

    # Another name at the same address: the certificate is not for it, and nothing is sent.
    fake_dns["other.test"] = ["127.0.0.1"]
    err = fetch_error(f"https://other.test:{tls_site.port}/echo", ctx(["other.test:*"]))
    assert "CERTIFICATE_VERIFY_FAILED" in str(err) and "other.test" in str(err)
    assert tls_site.paths() == ["/echo"]


# --- errors ------------------------------------------------------------------------------------


def test_404_is_a_permanent_error(site):
    err = fetch_error(site.url("/missing"))
    assert type(err) is ToolError
    assert str(err) == f"{site.url('/missing')} answered 404 Not Found"


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/unavailable", "503 Service Unavailable (Retry-After: 7)"), ("/busy", "429")],
)
def test_5xx_and_429_are_transient(site, path, expected):
    with pytest.raises(TransientToolError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        fetch(site.url(path))


def test_connection_refused_is_transient():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(TransientToolError, match="could not fetch"):
        fetch(f"http://127.0.0.1:{port}/")


def test_slow_response_times_out_as_transient(site, monkeypatch):
    monkeypatch.setattr(http_tool, "DEADLINE", 0.5)
    started = time.monotonic()
    with pytest.raises(TransientToolError, match="timed out"):
        fetch(site.url("/slow"))
    assert time.monotonic() - started < 3
    assert site.paths() == ["/slow"]


def test_slow_drip_body_hits_the_overall_deadline(site, monkeypatch):
    monkeypatch.setattr(http_tool, "DEADLINE", 0.5)
    started = time.monotonic()
    with pytest.raises(TransientToolError, match=r"took longer than 0.5s to send its body"):
        fetch(site.url("/drip"))
    assert time.monotonic() - started < 3


# --- the registered tool and its arguments -----------------------------------------------------


def test_registered_spec():
    spec = registry.get("http_get")
    assert spec is not None and spec.func is http_get
    assert (spec.risk, spec.timeout, spec.retries) == ("medium", 15, 2)
    assert set(spec.parameters_schema()["properties"]) == {"url", "max_bytes"}
    assert spec.timeout > http_tool.DEADLINE


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"url": "ftp://127.0.0.1/file"}, "only http:// and https://"),
        ({"url": "file:///etc/passwd"}, "only http:// and https://"),
        ({"url": "javascript:alert(1)"}, "only http:// and https://"),
        ({"url": "127.0.0.1/no-scheme"}, "only http:// and https://"),
        ({"url": "http:///no-host"}, "no host"),
        ({"url": "http://127.0.0.1:99999/"}, "not a valid URL"),
        ({"url": "https://example.com/" + "a" * 2000}, "at most 2000 characters"),
        ({"url": "https://example.com/", "max_bytes": 0}, "max_bytes"),
        ({}, "url: Field required"),
    ],
)
def test_args_schema_rejects_bad_arguments(arguments, message):
    with pytest.raises(ToolArgumentsInvalid, match=message):
        registry.get("http_get").validate(arguments)


def test_args_schema_rejects_credentials_without_echoing_them():
    with pytest.raises(ToolArgumentsInvalid) as info:
        registry.get("http_get").validate({"url": "https://bot:hunter2@example.com/"})
    assert "user name or password" in str(info.value) and "hunter2" not in str(info.value)


def test_args_schema_accepts_http_and_https_urls():
    spec = registry.get("http_get")
    args = spec.validate({"url": "  https://docs.example.com/a?b=c  ", "max_bytes": 5})
    assert (args.url, args.max_bytes) == ("https://docs.example.com/a?b=c", 5)
    assert spec.validate({"url": "http://127.0.0.1:8000/"}).max_bytes is None
