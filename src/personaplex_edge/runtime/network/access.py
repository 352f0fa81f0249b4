"""Who may talk to the car: loopback clients, and clients presenting the access token; TLS."""

from __future__ import annotations

import hmac
import ipaddress
import ssl
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from personaplex_edge.runtime.errors import ConfigError


def is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return (mapped or ip).is_loopback


def presented_token(path: str, authorization: str | None) -> str:
    """The token a client presents: `Authorization: Bearer T`, or `worker_auth_id=T` (the
    field NVIDIA's web client sends)."""
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    values = parse_qs(urlsplit(path).query).get("worker_auth_id", [""])
    return values[-1]


def allowed(peer: str, path: str, authorization: str | None, token: str | None) -> str | None:
    """None if the client may connect; otherwise why not (the 401 response's text)."""
    if is_loopback(peer):
        return None
    if token is None:  # the config refuses this; never let it through by accident
        return "unauthorized: this endpoint takes no clients from the network"
    given = presented_token(path, authorization)
    if not given:
        return "unauthorized: present the access token (worker_auth_id or Authorization: Bearer)"
    if not hmac.compare_digest(given.encode(), token.encode()):
        return "unauthorized: wrong access token"
    return None


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context from PEM files; ConfigError naming the field when they do not load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"network.tls_cert/tls_key: {cert}, {key}: {exc}") from None
    return context
