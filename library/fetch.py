"""Fetch an image by URL without letting the URL reach what it must not.

* http/https only; every hop's host is resolved ONCE, every address it resolves to is checked against the
  allow/deny networks, and the connection goes to that checked address (the Host header and TLS SNI carry
  the name), so a DNS answer that changes between check and connect (rebinding) cannot redirect us;
* redirects are followed by hand, each hop checked the same way, at most ``fetch_max_redirects``;
* the body is streamed with a byte limit and one deadline for the whole fetch (an endless or dripping body
  ends in an error, not a hung worker);
* environment proxies are ignored (a proxy would connect on our behalf to unchecked addresses).

What the bytes are is decided later by sniffing them (``ai_service.imaging.probe_image``), never from the
URL's extension or the Content-Type.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass

import httpx

from library.settings import LibrarySettings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class FetchError(ValueError):
    """The URL could not be fetched (reason safe to show to the caller)."""


class FetchTooLargeError(FetchError):
    """The body is larger than ``max_image_bytes``."""


@dataclass(frozen=True)
class Fetched:
    data: bytes
    url: str  # the final URL, after redirects


class NetworkPolicy:
    def __init__(self, allow: list[str], deny: list[str]) -> None:
        self.allow: list[IPNetwork] = [ipaddress.ip_network(n, strict=False) for n in allow]
        self.deny: list[IPNetwork] = [ipaddress.ip_network(n, strict=False) for n in deny]

    @classmethod
    def from_settings(cls, settings: LibrarySettings) -> NetworkPolicy:
        return cls(settings.fetch_allow_networks, settings.fetch_deny_networks)

    def refusal(self, address: IPAddress) -> str | None:
        """Why ``address`` may not be fetched, or None when it may."""
        # ::ffff:169.254.169.254 and 64:ff9b::/96 style spellings are judged as the IPv4 address they carry.
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in net for net in self.deny):
            return f"address {address} is in a denied network (LIBRARY_FETCH_DENY_NETWORKS)"
        if self.allow and not any(address in net for net in self.allow):
            return f"address {address} is not in LIBRARY_FETCH_ALLOW_NETWORKS"
        return None


def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise FetchError(f"cannot resolve host {host!r}: {exc}") from None
    seen: list[IPAddress] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address not in seen:
            seen.append(address)
    if not seen:
        raise FetchError(f"host {host!r} has no address")
    return seen


def _checked_address(url: httpx.URL, policy: NetworkPolicy) -> IPAddress:
    if url.scheme not in ("http", "https"):
        raise FetchError(f"only http and https URLs can be fetched, not {url.scheme or 'a relative URL'!r}")
    if not url.host:
        raise FetchError("the URL has no host")
    port = url.port or (443 if url.scheme == "https" else 80)
    addresses = _resolve(url.host, port)
    for address in addresses:
        # Every answer must pass: a name that resolves to a public and a metadata address is refused.
        why = policy.refusal(address)
        if why:
            raise FetchError(f"refusing to fetch {url.host}: {why}")
    return addresses[0]


def _pinned_request(
    client: httpx.Client, url: httpx.URL, address: IPAddress, settings: LibrarySettings
) -> httpx.Request:
    host_header = url.host if url.port is None else f"{url.host}:{url.port}"
    pinned = url.copy_with(host=str(address))
    extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
    return client.build_request(
        "GET",
        pinned,
        headers={
            "Host": host_header,
            "User-Agent": settings.fetch_user_agent,
            "Accept": "image/*",
            # Raw bytes only: the byte limit then bounds what we hold (no compressed-transfer bomb).
            "Accept-Encoding": "identity",
        },
        extensions=extensions,
    )


def fetch_image_bytes(url: str, settings: LibrarySettings, policy: NetworkPolicy | None = None) -> Fetched:
    """GET ``url`` under the library's limits; raises :class:`FetchError` with a readable reason."""
    policy = policy or NetworkPolicy.from_settings(settings)
    deadline = time.monotonic() + settings.fetch_timeout_s
    try:
        current = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise FetchError(f"invalid URL: {exc}") from None
    timeout = httpx.Timeout(settings.fetch_timeout_s, connect=settings.fetch_connect_timeout_s)
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for _hop in range(settings.fetch_max_redirects + 1):
            address = _checked_address(current, policy)
            request = _pinned_request(client, current, address, settings)
            try:
                response = client.send(request, stream=True)
            except httpx.TimeoutException:
                raise FetchError(f"timed out connecting to {current.host}") from None
            except httpx.HTTPError as exc:
                raise FetchError(f"cannot fetch {current.host}: {type(exc).__name__}: {exc}") from None
            try:
                if response.is_redirect:
                    location = response.headers.get("location")
                    if not location:
                        raise FetchError(f"HTTP {response.status_code} without a Location header")
                    current = current.join(location)
                    continue
                if response.status_code != 200:
                    raise FetchError(f"HTTP {response.status_code} from {current.host}")
                return Fetched(data=_read_body(response, settings, deadline), url=str(current))
            finally:
                response.close()
    raise FetchError(f"more than {settings.fetch_max_redirects} redirects (LIBRARY_FETCH_MAX_REDIRECTS)")


def _read_body(response: httpx.Response, settings: LibrarySettings, deadline: float) -> bytes:
    limit = settings.max_image_bytes
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise FetchTooLargeError(f"the image is {declared} bytes; the limit is {limit} (LIBRARY_MAX_IMAGE_BYTES)")
    chunks: list[bytes] = []
    size = 0
    try:
        for chunk in response.iter_raw():
            size += len(chunk)
            if size > limit:
                raise FetchTooLargeError(f"the image is larger than {limit} bytes (LIBRARY_MAX_IMAGE_BYTES)")
            if time.monotonic() > deadline:
                raise FetchError(f"download took longer than {settings.fetch_timeout_s:g}s (LIBRARY_FETCH_TIMEOUT_S)")
            chunks.append(chunk)
    except httpx.TimeoutException:
        raise FetchError("timed out reading the response") from None
    except httpx.HTTPError as exc:
        raise FetchError(f"the download failed: {type(exc).__name__}: {exc}") from None
    return b"".join(chunks)
