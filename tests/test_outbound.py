"""Where http_get and webhooks may connect: allowlist entries, addresses, the pinned target."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys

import pytest

from agentsite import outbound
from agentsite.outbound import Destination, HostPattern, parse_host_pattern


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "a loopback address"),
        ("::1", "a loopback address"),
        ("10.0.0.1", "a private address"),
        ("172.16.5.4", "a private address"),
        ("192.168.1.1", "a private address"),
        ("fd00::1", "a private address"),
        ("169.254.169.254", "a link-local address"),  # cloud metadata
        ("fe80::1", "a link-local address"),
        ("0.0.0.0", "an unspecified address"),  # noqa: S104
        ("::", "an unspecified address"),
        ("224.0.0.1", "a multicast address"),
        ("ff02::1", "a multicast address"),
        ("100.64.0.1", "a non-public address"),  # carrier-grade NAT
        ("192.0.2.1", "a private address"),  # documentation
        ("240.0.0.1", "a private address"),
        # IPv6 forms of IPv4 addresses are judged by the IPv4 address.
        ("::ffff:127.0.0.1", "a loopback address"),
        ("::ffff:10.0.0.1", "a private address"),
        ("2002:7f00:1::", "a loopback address"),  # 6to4
        ("64:ff9b::a9fe:a9fe", "a link-local address"),  # NAT64 of 169.254.169.254
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "a loopback address"),  # Teredo to 127.0.0.1
        ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", "a private address"),  # Teredo (not global)
        ("fec0::1", "a site-local address"),  # deprecated, but routed nowhere public
        ("192.0.0.8", "a special-purpose address"),  # IETF protocol assignments
        ("192.88.99.1", "a special-purpose address"),  # the deprecated 6to4 relay anycast
        ("::ffff:8.8.8.8", None),
        ("8.8.8.8", None),
        ("93.184.215.14", None),
        ("2606:4700::1111", None),
        ("64:ff9b::808:808", None),  # NAT64 of 8.8.8.8
    ],
)
def test_address_kinds(address, kind):
    assert outbound.address_kind(ipaddress.ip_address(address)) == kind


@pytest.mark.parametrize(
    ("entry", "wildcard", "pattern"),
    [
        ("Docs.Example.com.", "*.", HostPattern("docs.example.com")),
        ("docs.example.com:8443", "*.", HostPattern("docs.example.com", port=8443)),
        ("127.0.0.1:*", "*.", HostPattern("127.0.0.1", any_port=True)),
        ("*.example.org", "*.", HostPattern("example.org", subdomains=True, apex=False)),
        (
            "*.example.org:*",
            "*.",
            HostPattern("example.org", subdomains=True, apex=False, any_port=True),
        ),
        ("[::1]:8080", "*.", HostPattern("::1", port=8080)),
        ("[0:0::1]", "*.", HostPattern("::1")),
        (".example.com", ".", HostPattern("example.com", subdomains=True, apex=True)),
        (".example.com:9443", ".", HostPattern("example.com", subdomains=True, port=9443)),
    ],
)
def test_allowlist_entries(entry, wildcard, pattern):
    assert parse_host_pattern(entry, wildcard=wildcard) == pattern


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ("https://docs.example.com", "not a URL"),
        ("docs.example.com/path", "not a URL"),
        ("docs.example.com:", "the port must be a number from 1 to 65535, or *; not ''"),
        ("docs.example.com:0", "from 1 to 65535"),
        ("docs.example.com:65536", "from 1 to 65535"),
        ("docs.example.com:http", "not 'http'"),
        ("::1", "write an IPv6 address in brackets"),
        ("[::1", "[address] or [address]:port"),
        ("[::1]8080", "[address] or [address]:port"),
        ("[example.com]:80", "not an IPv6 address"),
        ("*", "not a host name"),
        ("user@example.com", "not a host name"),
        ("*.10.0.0.1", "a wildcard applies to domain names"),
        ("", "not a host name"),
    ],
)
def test_bad_allowlist_entries_say_what_is_wrong(entry, words):
    with pytest.raises(ValueError) as info:
        parse_host_pattern(entry, wildcard="*.")
    assert words in str(info.value)


@pytest.mark.parametrize(
    ("url", "entry", "allowed"),
    [
        ("http://docs.example.com/", "docs.example.com", True),
        ("https://docs.example.com/", "docs.example.com", True),
        ("https://docs.example.com:443/", "docs.example.com", True),
        ("https://docs.example.com:80/", "docs.example.com", False),
        ("http://docs.example.com:8080/", "docs.example.com", False),
        ("http://docs.example.com:8080/", "docs.example.com:8080", True),
        ("http://docs.example.com/", "docs.example.com:8080", False),
        ("http://docs.example.com:1/", "docs.example.com:*", True),
        ("https://a.example.org:8443/", "*.example.org:8443", True),
        ("https://example.org:8443/", "*.example.org:8443", False),
        ("http://[::1]:8080/", "[::1]:8080", True),
        ("http://[0::1]:8080/", "[::1]:8080", True),
        ("http://[::1]/", "[::1]:8080", False),
    ],
)
def test_allowlist_matching_takes_the_port(url, entry, allowed):
    pattern = parse_host_pattern(entry, wildcard="*.")
    assert pattern.matches(outbound.destination(url)) is allowed


def test_destination_of_a_url():
    assert outbound.destination("HTTPS://Docs.Example.com./a") == Destination(
        "https", "docs.example.com", 443
    )
    for url, words in [
        ("ftp://example.com/", "not an http or https URL"),
        ("http:///x", "no host"),
        ("http://example.com:99999/", "not a valid URL"),
        ("http://example.com:0/", "port 0"),
    ]:
        with pytest.raises(ValueError, match=words):
            outbound.destination(url)


def test_pin_connects_to_the_checked_address_and_keeps_the_name(fake_dns, settings):
    settings.AGENTSITE_OUTBOUND_ALLOWED_NETWORKS = []
    fake_dns["docs.example.com"] = ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]
    target = outbound.pin("https://docs.example.com:8443/a?b=c")
    assert target.url == "https://93.184.215.14:8443/a?b=c"
    assert target.headers == {"Host": "docs.example.com:8443"}
    assert target.extensions == {"sni_hostname": "docs.example.com"}

    fake_dns["v6.example.com"] = ["2606:2800:21f:cb07:6820:80da:af6b:8b2c"]
    target = outbound.pin("http://v6.example.com/")
    assert target.url == "http://[2606:2800:21f:cb07:6820:80da:af6b:8b2c]/"
    assert target.headers == {"Host": "v6.example.com"}

    target = outbound.pin("https://8.8.8.8/dns")  # an address: nothing resolved, no SNI
    assert (target.url, target.headers, target.extensions) == (
        "https://8.8.8.8/dns",
        {"Host": "8.8.8.8"},
        {},
    )


def test_allowed_networks_let_non_public_addresses_through(fake_dns, settings):
    fake_dns["intranet.example.com"] = ["10.1.2.3"]
    fake_dns["mapped.example.com"] = ["::ffff:10.1.2.3"]
    settings.AGENTSITE_OUTBOUND_ALLOWED_NETWORKS = ["10.1.0.0/16"]
    assert outbound.pin("http://intranet.example.com/").address == "10.1.2.3"
    assert outbound.pin("http://mapped.example.com/").address == "::ffff:a01:203"
    with pytest.raises(outbound.DestinationRefused, match="10.2.0.1 is a private address"):
        outbound.pin("http://10.2.0.1/")
    with pytest.raises(outbound.DestinationRefused, match="127.0.0.1 is a loopback address"):
        outbound.pin("http://127.0.0.1:6379/")


def _import_settings(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import agentsite.settings"],
        env={**os.environ, "DEBUG": "1", **env},
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        (
            "AGENTSITE_OUTBOUND_ALLOWED_NETWORKS",
            "127.0.0.0/8,10.0.0.0/33",
            "AGENTSITE_OUTBOUND_ALLOWED_NETWORKS: '10.0.0.0/33' is not a network such as",
        ),
        (
            "AGENTSITE_WEBHOOK_ALLOWED_HOSTS",
            "hooks.example.com,hooks.example.org:http",
            "AGENTSITE_WEBHOOK_ALLOWED_HOSTS: 'hooks.example.org:http': the port must be",
        ),
        (
            "AGENTSITE_WEBHOOK_ALLOWED_HOSTS",
            "*.example.com",
            "use a name such as docs.example.com, .example.com for subdomains",
        ),
    ],
)
def test_bad_settings_stop_the_start(name, value, words):
    result = _import_settings(**{name: value})
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr and words in result.stderr


def test_good_settings_start():
    result = _import_settings(
        AGENTSITE_OUTBOUND_ALLOWED_NETWORKS="10.20.0.0/16, fd00::/8,192.168.1.5",
        AGENTSITE_WEBHOOK_ALLOWED_HOSTS="hooks.example.com,.example.org:8443,[::1]:*",
    )
    assert result.returncode == 0, result.stderr


def test_the_system_resolver_is_used_by_default(settings):
    # localhost resolves from the hosts file, without a DNS server.
    settings.AGENTSITE_OUTBOUND_ALLOWED_NETWORKS = []
    with pytest.raises(outbound.DestinationRefused, match="'localhost' resolves to .*loopback"):
        outbound.pin("http://localhost:8080/")
    settings.AGENTSITE_OUTBOUND_ALLOWED_NETWORKS = ["127.0.0.0/8", "::1/128"]
    target = outbound.pin("http://localhost:8080/")
    assert target.address in ("127.0.0.1", "::1") and target.headers == {"Host": "localhost:8080"}
