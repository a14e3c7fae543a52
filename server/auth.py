"""Bearer tokens with scopes for the admin API.

Tokens come from a JSON file (`{"tokens": [{"name": "ops", "token": "...", "scopes": ["read", "rollout"]}]}`) or
the environment variable PERSONAFL_ADMIN_TOKENS (`name:token:scope+scope,...`). Scopes: `read` (look), `rollout`
(canary, promote, rollback, pause), `admin` (everything, including the audit log). Only SHA-256 digests are kept
in memory, and a presented token is compared with every known digest in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path

SCOPES = ("read", "rollout", "admin")
TOKENS_ENV = "PERSONAFL_ADMIN_TOKENS"


class TokenConfigError(ValueError):
    """A token file or variable that cannot be used."""


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenStore:
    def __init__(self, entries: list[tuple[str, str, list[str]]]):
        self._entries = []
        names, digests = set(), set()
        for name, token, scopes in entries:
            if not isinstance(name, str) or not isinstance(token, str) or not all(isinstance(s, str) for s in scopes):
                raise TokenConfigError(f"token {name!r}: name, token and scopes must be strings")
            # A token listed twice (with whatever scopes) would silently grant one of the two scope sets, and a
            # name listed twice would make the audit log ambiguous: refuse both.
            if name in names:
                raise TokenConfigError(f"token name {name!r} is listed more than once")
            if _digest(token) in digests:
                raise TokenConfigError(f"token {name!r} has the same token as an earlier entry")
            names.add(name)
            digests.add(_digest(token))
            unknown = set(scopes) - set(SCOPES)
            if unknown:
                raise TokenConfigError(f"token {name!r}: unknown scopes {sorted(unknown)} (known: {SCOPES})")
            if len(token) < 16:
                raise TokenConfigError(f"token {name!r} is shorter than 16 characters")
            self._entries.append((_digest(token), Principal(name, frozenset(scopes))))
        if not self._entries:
            raise TokenConfigError("no admin tokens configured")

    @classmethod
    def from_file(cls, path: Path) -> "TokenStore":
        try:
            data = json.loads(Path(path).read_text())
            tokens = data["tokens"]
            if not isinstance(tokens, list) or not all(isinstance(t, dict) and isinstance(t["scopes"], list)
                                                       for t in tokens):
                raise TypeError('"tokens" must be a list of {"name", "token", "scopes": [...]} objects')
            return cls([(t["name"], t["token"], list(t["scopes"])) for t in tokens])
        except FileNotFoundError:
            raise TokenConfigError(f"token file {path} not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise TokenConfigError(f"token file {path} is malformed: {e}") from None

    @classmethod
    def from_env(cls, var: str = TOKENS_ENV) -> "TokenStore":
        entries = []
        for item in filter(None, (s.strip() for s in os.environ.get(var, "").split(","))):
            parts = item.split(":")
            if len(parts) != 3:
                raise TokenConfigError(f"{var}: expected name:token:scope+scope, got {len(parts)} fields")
            entries.append((parts[0], parts[1], parts[2].split("+")))
        return cls(entries)

    def authenticate(self, token: str) -> Principal | None:
        presented = _digest(token)
        found = None
        for digest, principal in self._entries:  # no early exit: time does not depend on which token matched
            if hmac.compare_digest(presented, digest):
                found = principal
        return found
