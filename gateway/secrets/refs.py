"""Secret references: plain strings that name a secret, never hold one.

Syntax (docs/secrets.md)::

    vault:MOUNT/PATH[?version=N]#FIELD      KV (v2 or v1) secret field, optionally a fixed version
    vault-dynamic:MOUNT/PATH#FIELD          a leased secret (database/AWS-style creds), renewed while used
    env:NAME                                an environment variable of the gateway process
    file:/ABSOLUTE/PATH                     the contents of a file (trailing newline stripped)
    local:NAME                              the gateway's local encrypted store (egress secret put)

Header values may embed references as ``${REF}``; ``$${`` is a literal ``${``::

    authorization: "Bearer ${vault:secret/acme/github#token}"

A reference's canonical text (``str(ref)``) is what logs, audit events and
error messages show: names only, never values. Parsing is strict: anything
that is not exactly one of the forms above is an error with its position.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEMES = ("vault", "vault-dynamic", "env", "file", "local")

_SEGMENT = r"[A-Za-z0-9_.@-]+"
_VAULT_RE = re.compile(rf"(?P<mount>{_SEGMENT})/(?P<path>{_SEGMENT}(?:/{_SEGMENT})*)"
                       r"(?:\?version=(?P<version>[1-9][0-9]{0,8}))?#(?P<field>[A-Za-z0-9_.@-]+)")
_ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_FILE_RE = re.compile(r"/[^\x00-\x1f\x7f]{0,4095}")
_LOCAL_RE = re.compile(r"[a-z0-9]([a-z0-9._/-]{0,126}[a-z0-9])?")


class RefError(ValueError):
    """A malformed reference or template; ``column`` is 1-based within the text."""

    def __init__(self, message: str, column: int = 1):
        super().__init__(message)
        self.message = message
        self.column = column


@dataclass(frozen=True)
class SecretRef:
    scheme: str  # one of SCHEMES
    name: str  # vault: "MOUNT/PATH"; env: NAME; file: PATH; local: NAME
    field: str = ""  # vault, vault-dynamic
    version: int = 0  # vault KV: 0 = latest

    @property
    def mount(self) -> str:
        return self.name.split("/", 1)[0] if self.scheme.startswith("vault") else ""

    @property
    def path(self) -> str:
        return self.name.split("/", 1)[1] if self.scheme.startswith("vault") else ""

    @property
    def dynamic(self) -> bool:
        return self.scheme == "vault-dynamic"

    def __str__(self) -> str:
        if self.scheme in ("vault", "vault-dynamic"):
            v = f"?version={self.version}" if self.version else ""
            return f"{self.scheme}:{self.name}{v}#{self.field}"
        return f"{self.scheme}:{self.name}"


def parse_ref(text: str) -> SecretRef:
    """Parse one reference (no ``${}``); raises RefError."""
    if not isinstance(text, str):
        raise RefError("a secret reference must be a string")
    scheme, sep, rest = text.partition(":")
    if not sep:
        raise RefError(f"not a secret reference (expected one of {', '.join(s + ':' for s in SCHEMES)})")
    if scheme not in SCHEMES:
        raise RefError(f"unknown secret scheme {scheme!r} (expected one of {', '.join(SCHEMES)})")
    col = len(scheme) + 2
    if scheme in ("vault", "vault-dynamic"):
        m = _VAULT_RE.fullmatch(rest)
        if not m:
            raise RefError(f"{scheme}: expected MOUNT/PATH{'[?version=N]' if scheme == 'vault' else ''}#FIELD",
                           col)
        if any(seg in (".", "..") for seg in f"{m.group('mount')}/{m.group('path')}".split("/")):
            raise RefError(f"{scheme}: path segments cannot be . or ..", col)
        if scheme == "vault-dynamic" and m.group("version"):
            raise RefError("vault-dynamic: leased secrets have no versions", col + rest.index("?"))
        return SecretRef(scheme, f"{m.group('mount')}/{m.group('path')}", m.group("field"),
                         int(m.group("version") or 0))
    if scheme == "env":
        if not _ENV_RE.fullmatch(rest):
            raise RefError("env: expected a variable name (letters, digits, _)", col)
        return SecretRef("env", rest)
    if scheme == "file":
        if not _FILE_RE.fullmatch(rest) or "/../" in rest + "/" or rest.endswith("/"):
            raise RefError("file: expected an absolute path to a file", col)
        return SecretRef("file", rest)
    if not _LOCAL_RE.fullmatch(rest):
        raise RefError("local: expected a name (lowercase letters, digits, . _ / -)", col)
    return SecretRef("local", rest)


@dataclass(frozen=True)
class Template:
    """A header value with embedded references: literal strings and SecretRefs."""

    parts: tuple[str | SecretRef, ...]

    @property
    def refs(self) -> tuple[SecretRef, ...]:
        return tuple(p for p in self.parts if isinstance(p, SecretRef))

    def render(self, values: dict[SecretRef, str]) -> str:
        """Substitute every reference; KeyError (naming the reference) if one is
        missing, so a value is never sent with a part of its credentials."""
        out = []
        for p in self.parts:
            if isinstance(p, SecretRef):
                if p not in values:
                    raise KeyError(str(p))
                out.append(values[p])
            else:
                out.append(p)
        return "".join(out)

    def __str__(self) -> str:
        return "".join(f"${{{p}}}" if isinstance(p, SecretRef) else p.replace("${", "$${") for p in self.parts)


def parse_template(text: str) -> Template:
    """Parse ``literal ${ref} literal``; ``$${`` is a literal ``${``."""
    if not isinstance(text, str):
        raise RefError("a header value must be a string")
    parts: list[str | SecretRef] = []
    buf: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        if text.startswith("$${", i):
            buf.append("${")
            i += 3
            continue
        if text.startswith("${", i):
            end = text.find("}", i + 2)
            if end < 0:
                raise RefError("unterminated ${ (missing })", i + 1)
            try:
                ref = parse_ref(text[i + 2:end])
            except RefError as e:
                raise RefError(e.message, i + 2 + e.column) from None
            if buf:
                parts.append("".join(buf))
                buf = []
            parts.append(ref)
            i = end + 1
            continue
        buf.append(text[i])
        i += 1
    if buf:
        parts.append("".join(buf))
    if any(isinstance(p, str) and any(c in p for c in "\r\n\x00") for p in parts):
        raise RefError("a header value cannot contain CR, LF or NUL")
    return Template(tuple(parts))
