"""Request authentication shared by the blueprints."""

from __future__ import annotations

import hmac
import ipaddress

from flask import Request


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def token_matches(presented: str | None, expected: str) -> bool:
    # Constant time, so the comparison leaks nothing about the token.
    return presented is not None and hmac.compare_digest(presented.encode(), expected.encode())


def is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
