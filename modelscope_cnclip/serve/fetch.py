"""Fetching image URLs for a server without letting requests reach the server's own network (SSRF).

Each hop's host is resolved once, every address it resolves to must be public (not loopback, private, link-local,
shared, reserved, multicast or unspecified; IPv4-mapped IPv6 addresses are judged as IPv4), and the connection goes
to that checked address (the ``Host`` header and TLS server name keep the original host, so certificates are still
verified), so a DNS answer that changes between the check and the connection cannot redirect it. Redirects are
followed by hand, each target checked the same way. Proxies from the environment are ignored (they would connect
on the server's behalf, unchecked). Size and time are bounded.
"""
from __future__ import annotations

import ipaddress
import socket
import time
from urllib.parse import urljoin, urlsplit, urlunsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UrlRefused(ValueError):
    """An image URL the server will not fetch (scheme, address, size, time, status); the message names it."""


# IPv6 ranges that reach IPv4 hosts (NAT64, 6to4, IPv4-compatible) or are deprecated site-local: their targets
# cannot be judged from the IPv6 address alone, so they are refused outright.
_TRANSLATED = tuple(ipaddress.ip_network(n) for n in ('64:ff9b::/96', '64:ff9b:1::/48', '2002::/16', '::/96',
                                                        'fec0::/10', '2001::/32', '::ffff:0:0:0/96'))


def is_public_address(ip: IPAddress) -> bool:
    """True for addresses on the public internet only (``ipaddress``'s ``is_global``, minus multicast); IPv4-mapped
    IPv6 addresses are judged as their IPv4 address, and IPv6 ranges that translate to IPv4 (NAT64, 6to4, Teredo,
    IPv4-compatible) or are site-local are refused."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif any(ip in net for net in _TRANSLATED):
            return False
    return ip.is_global and not ip.is_multicast


def resolve_public(host: str, port: int, url: str) -> IPAddress:
    """The address to connect to for ``host``: every address it resolves to must be public.

    Raises:
        UrlRefused: the host does not resolve, or resolves to any non-public address.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise UrlRefused(f'image URL {url!r}: cannot resolve host {host!r} ({e})') from None
    addresses = [ipaddress.ip_address(info[4][0].split('%')[0]) for info in infos]
    if not addresses:
        raise UrlRefused(f'image URL {url!r}: host {host!r} has no address')
    for ip in addresses:
        if not is_public_address(ip):
            raise UrlRefused(f'image URL {url!r}: host {host!r} is {ip}, not a public address (loopback, private, '
                             f'link-local and reserved networks are refused)')
    return addresses[0]


def fetch_public(url: str, *, timeout: float = 10.0, max_bytes: int = 20 << 20, max_redirects: int = 3) -> bytes:
    """GET ``url`` (http or https) from a public address and return the body.

    Args:
        url: the URL; user info (``user:pass@``) is refused.
        timeout: seconds for the whole fetch, redirects included.
        max_bytes: largest body accepted.
        max_redirects: redirects followed (each target checked like the first URL).

    Raises:
        UrlRefused: a scheme other than http(s), a non-public address, too many redirects, a body over
            ``max_bytes``, a timeout, an HTTP error status or a connection failure; the message names the URL.
    """
    import httpx

    deadline = time.monotonic() + timeout
    original = url
    with httpx.Client(follow_redirects=False, trust_env=False, timeout=timeout) as client:
        for _ in range(max_redirects + 1):
            try:
                parts = urlsplit(url)
                parts.port  # noqa: B018 - raises ValueError for an invalid port
            except ValueError as e:
                raise UrlRefused(f'image URL {url!r}: not a valid URL ({e})') from None
            if parts.scheme not in ('http', 'https') or not parts.hostname:
                raise UrlRefused(f'image URL {url!r}: only http(s) URLs with a host are fetched')
            if parts.username is not None or parts.password is not None:
                raise UrlRefused(f'image URL {url!r}: URLs with credentials are refused')
            port = parts.port or (443 if parts.scheme == 'https' else 80)  # checked above
            ip = resolve_public(parts.hostname, port, url)
            host = f'[{ip}]' if ip.version == 6 else str(ip)
            target = urlunsplit((parts.scheme, f'{host}:{port}', parts.path or '/', parts.query, ''))
            left = deadline - time.monotonic()
            if left <= 0:
                raise UrlRefused(f'image URL {original!r}: took longer than {timeout:g} s')
            try:
                with client.stream('GET', target, headers={'Host': parts.netloc},
                                   extensions={'sni_hostname': parts.hostname},
                                   timeout=httpx.Timeout(left)) as response:
                    if response.is_redirect:
                        location = response.headers.get('location')
                        if not location:
                            raise UrlRefused(f'image URL {url!r}: redirect without a location')
                        url = urljoin(url, location)
                        continue
                    if response.status_code >= 400:
                        raise UrlRefused(f'image URL {url!r}: the server answered HTTP {response.status_code}')
                    declared = response.headers.get('content-length')
                    if declared and declared.isdigit() and int(declared) > max_bytes:
                        raise UrlRefused(f'image URL {url!r}: {int(declared):,} bytes is more than the limit of '
                                         f'{max_bytes:,}')
                    body = bytearray()
                    for chunk in response.iter_bytes():
                        body += chunk
                        if len(body) > max_bytes:
                            raise UrlRefused(f'image URL {url!r}: more than the limit of {max_bytes:,} bytes')
                        if time.monotonic() > deadline:
                            raise UrlRefused(f'image URL {original!r}: took longer than {timeout:g} s')
                    return bytes(body)
            except httpx.TimeoutException:
                raise UrlRefused(f'image URL {original!r}: took longer than {timeout:g} s') from None
            except httpx.HTTPError as e:
                raise UrlRefused(f'image URL {url!r}: {type(e).__name__}: {e}') from None
    raise UrlRefused(f'image URL {original!r}: more than {max_redirects} redirects')
