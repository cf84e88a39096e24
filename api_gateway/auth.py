"""API keys: off by default; with a key file every request needs `Authorization: Bearer KEY`.

The key file (`--api-keys FILE` or $PAGEDSERVE_API_KEYS) holds one JSON object a line; blank
lines and lines starting with # are skipped:

    {"key": "sk-alice-0123456789", "name": "alice", "models": ["tiny"], "rpm": 60, "tpm": 40000}
    {"key": "sk-ops-9876543210", "name": "ops", "max_concurrent": 4}

- key (required): the secret the client sends; kept in memory only as its SHA-256.
- name: who the key belongs to, shown in access logs and naming its rate-limit buckets (two
  gateways with the same file share limits through Redis); default: "key-" + a hash prefix.
- models: the models this key may use (others answer 404, as OpenAI does for models you
  cannot see); default: every model.
- rpm, tpm: requests and tokens per minute (prompt + completion); default: no limit.
- max_concurrent: requests in flight at once for this key; default: no per-key limit.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pagedserve.api_gateway.errors import GatewayError

_FIELDS = {"key", "name", "models", "rpm", "tpm", "max_concurrent"}


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    name: str
    models: frozenset[str] | None = None  # None: every model
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


def _positive_int(entry: dict, field: str, where: str) -> int | None:
    value = entry.get(field)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{where}: {field} must be a positive integer; got {value!r}")
    return value


def parse_entry(entry: object, where: str) -> tuple[str, ApiKey]:
    """(the key's digest, its ApiKey) from one line's object; ValueError says what is wrong."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: each line must be a JSON object")
    unknown = set(entry) - _FIELDS
    if unknown:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)}; known: {sorted(_FIELDS)}")
    secret = entry.get("key")
    if not isinstance(secret, str) or not secret or secret != secret.strip() or " " in secret:
        raise ValueError(f"{where}: key must be a non-empty string without spaces")
    digest = _digest(secret)
    name = entry.get("name", f"key-{digest[:8]}")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}: name must be a non-empty string")
    models = entry.get("models")
    if models is not None and (
        not isinstance(models, list) or not all(isinstance(m, str) and m for m in models)
    ):
        raise ValueError(f"{where}: models must be a list of model names")
    key = ApiKey(
        name=name,
        models=frozenset(models) if models is not None else None,
        rpm=_positive_int(entry, "rpm", where),
        tpm=_positive_int(entry, "tpm", where),
        max_concurrent=_positive_int(entry, "max_concurrent", where),
    )
    return digest, key


class KeyRing:
    """The configured keys, looked up by the SHA-256 of what the client sends."""

    def __init__(self, keys: dict[str, ApiKey]) -> None:
        self._keys = keys

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, secret: str) -> bool:
        return _digest(secret) in self._keys

    def has_rate_limits(self) -> bool:
        return any(k.rpm is not None or k.tpm is not None for k in self._keys.values())

    def has_concurrency_limits(self) -> bool:
        return any(k.max_concurrent is not None for k in self._keys.values())

    @classmethod
    def load(cls, path: str | Path) -> KeyRing:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as e:
            raise ValueError(f"cannot read the API key file {path}: {e}") from e
        keys: dict[str, ApiKey] = {}
        names: set[str] = set()
        for number, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            where = f"{path}:{number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg})") from e
            digest, key = parse_entry(entry, where)
            if digest in keys:
                raise ValueError(f"{where}: this key is already listed")
            if key.name in names:
                raise ValueError(f"{where}: the name {key.name!r} is already used")
            keys[digest] = key
            names.add(key.name)
        if not keys:
            raise ValueError(f"the API key file {path} lists no keys")
        return cls(keys)

    def authenticate(self, authorization: str | None) -> ApiKey:
        """The key of an `Authorization: Bearer KEY` header; a 401 in OpenAI's words if not."""
        if not authorization:
            raise GatewayError(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                code="missing_api_key",
            )
        scheme, _, secret = authorization.partition(" ")
        key = self._keys.get(_digest(secret.strip())) if scheme.lower() == "bearer" else None
        if key is None:
            raise GatewayError(401, "Incorrect API key provided.", code="invalid_api_key")
        return key
