"""What an allow rule injects, and applying it to a request's headers (pure).

A rule's ``inject`` block::

    inject:
      headers:                       # set (replacing whatever the sandbox sent)
        authorization: "Bearer ${vault:secret/acme/github#token}"
      placeholders:                  # the sandbox may send egress-secret:ALIAS; it is swapped
        github: vault:secret/acme/github#token
      allow_plaintext: false         # default: inject only over verified TLS (https, wss)

Any ``egress-secret:ALIAS`` in a request header whose winning rule does not
grant ALIAS makes the request refused, never forwarded with the placeholder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.secrets.refs import SecretRef, Template

PLACEHOLDER_PREFIX = "egress-secret:"
PLACEHOLDER_RE = re.compile(r"egress-secret:([a-z0-9][a-z0-9._-]{0,62})")
ALIAS_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
HEADER_NAME_RE = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")
# Headers the gateway will not set: framing, routing and hop-by-hop headers.
FORBIDDEN_HEADERS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te", "trailer",
    "proxy-authorization", "proxy-connection", "proxy-authenticate", ":authority", ":method", ":path", ":scheme",
})


@dataclass(frozen=True)
class Injection:
    headers: tuple[tuple[str, Template], ...] = ()
    placeholders: tuple[tuple[str, SecretRef], ...] = ()
    allow_plaintext: bool = False

    def refs(self, aliases_used: frozenset[str] = frozenset()) -> tuple[SecretRef, ...]:
        """References needed: every header template's, plus the placeholders used."""
        out: dict[SecretRef, None] = {}
        for _, t in self.headers:
            for r in t.refs:
                out[r] = None
        for alias, r in self.placeholders:
            if alias in aliases_used:
                out[r] = None
        return tuple(out)

    def alias(self, name: str) -> SecretRef | None:
        for a, r in self.placeholders:
            if a == name:
                return r
        return None


def placeholders_in(headers) -> frozenset[str]:
    """Aliases of every ``egress-secret:ALIAS`` in header values (name, value pairs)."""
    found: set[str] = set()
    for _, v in headers:
        if PLACEHOLDER_PREFIX in v:
            found.update(PLACEHOLDER_RE.findall(v))
            if not PLACEHOLDER_RE.search(v):
                found.add("")  # a malformed placeholder: never forwarded
    return frozenset(found)


def apply(injection: Injection, fields: list[tuple[str, str]], values: dict[SecretRef, str]) -> list[tuple[str, str]]:
    """New header fields (original-case names kept): placeholders swapped, then
    the injected headers set, replacing any the sandbox sent under those names."""
    set_names = {n for n, _ in injection.headers}
    out = []
    for name, value in fields:
        if name.lower() in set_names:
            continue
        if PLACEHOLDER_PREFIX in value:
            value = PLACEHOLDER_RE.sub(lambda m: values[injection.alias(m.group(1))], value)
        out.append((name, value))
    for name, template in injection.headers:
        out.append((name, template.render(values)))
    return out
