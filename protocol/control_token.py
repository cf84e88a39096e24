"""The control token: an opt-in shared secret on the control plane.

With one (--control-token or $PAGEDSERVE_CONTROL_TOKEN), the controller and the workers refuse
control-plane calls that do not present it as `Authorization: Bearer TOKEN`, and every part
presents it on its own calls. Without one, every route stays open, as FastChat's are. The
helpers here check a token, build the header, compare one in constant time, and gate an ASGI
app; each service imports them from here.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable


def check_control_token(token: str | None) -> None:
    """ValueError unless `token` is None or fits in an HTTP header as one word."""
    if token is not None and not (
        token.isascii() and token.isprintable() and token.split() == [token]
    ):
        raise ValueError("control_token must be one word of printable ASCII (no spaces)")


def control_headers(token: str | None) -> dict[str, str]:
    """The header that presents the control token on a call; none without a token."""
    return {"authorization": f"Bearer {token}"} if token else {}


def check_bearer(authorization: bytes | None, token: str) -> bool:
    """Whether an `Authorization` header's value is `Bearer TOKEN` (compared in constant time)."""
    scheme, _, secret = (authorization or b"").partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(secret.strip(), token.encode())


Asgi = Callable[[dict, Callable, Callable], Awaitable[None]]


class ControlTokenGate:
    """ASGI middleware: an HTTP request to any path but `open_paths` must present `token`, else
    `refuse(scope)` answers it (a 401 in the route family's error format) before anything
    reads its body."""

    def __init__(
        self, app: Asgi, token: str, open_paths: frozenset[str], refuse: Callable[[dict], Asgi]
    ) -> None:
        self.app = app
        self.token = token
        self.open_paths = open_paths
        self.refuse = refuse

    def allows(self, scope: dict) -> bool:
        if scope["path"] in self.open_paths:
            return True
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        return check_bearer(header, self.token)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or self.allows(scope):
            await self.app(scope, receive, send)
        else:
            await self.refuse(scope)(scope, receive, send)
