"""The local encrypted secret store: the embedded default, so `make run` needs no Vault.

Layout under ``<state dir>/secrets/``:

* ``store.key``: a random 256-bit key (mode 0600), unless ``EGRESS_SECRETS_KEY``
  (base64url, 32 bytes) is set, which keeps the key off the disk.
* ``store.json``: ``{"v": 1, "secrets": {NAME: {"n": nonce, "c": ciphertext}}}``,
  each value sealed with AES-256-GCM and the name as associated data (a value
  cannot be moved to another name). Written atomically (temp file + rename).

Values never appear in errors or ``repr``; ``names()`` lists names only.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets as _secrets
import threading
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NAME_RE = re.compile(r"[a-z0-9]([a-z0-9._/-]{0,126}[a-z0-9])?")
KEY_ENV = "EGRESS_SECRETS_KEY"
MAX_VALUE = 64 * 1024


class StoreError(Exception):
    """The store cannot be used (bad key, corrupt file); never holds a value."""


def _b64e(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


def _b64d(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


class LocalStore:
    def __init__(self, state_dir: str | Path):
        self.dir = Path(state_dir) / "secrets"
        self.path = self.dir / "store.json"
        self._lock = threading.Lock()
        self._aead = AESGCM(self._key())

    def _key(self) -> bytes:
        env = os.environ.get(KEY_ENV)
        if env:
            try:
                key = _b64d(env.strip())
            except ValueError:
                key = b""
            if len(key) != 32:
                raise StoreError(f"{KEY_ENV} must be 32 bytes, base64url-encoded")
            return key
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        kp = self.dir / "store.key"
        if not kp.exists():
            try:
                fd = os.open(kp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(_b64e(_secrets.token_bytes(32)) + "\n")
            except FileExistsError:
                pass
        try:
            key = _b64d(kp.read_text().strip())
        except (OSError, ValueError):
            key = b""
        if len(key) != 32:
            raise StoreError(f"{kp} does not hold a valid store key")
        return key

    def _read(self) -> dict:
        if not self.path.exists():
            return {}
        try:
            doc = json.loads(self.path.read_text())
            items = doc["secrets"]
            if doc.get("v") != 1 or not isinstance(items, dict):
                raise ValueError
            return items
        except (OSError, ValueError, KeyError, TypeError):
            raise StoreError(f"{self.path} is not a valid secret store") from None

    def _write(self, items: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"v": 1, "secrets": items}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    @staticmethod
    def check_name(name: str) -> str:
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ValueError("secret names are lowercase letters, digits and . _ / - (up to 128 characters)")
        return name

    def put(self, name: str, value: str) -> None:
        self.check_name(name)
        if not isinstance(value, str) or not value:
            raise ValueError("a secret value must be a non-empty string")
        if len(value.encode()) > MAX_VALUE:
            raise ValueError(f"a secret value can be at most {MAX_VALUE} bytes")
        nonce = _secrets.token_bytes(12)
        sealed = self._aead.encrypt(nonce, value.encode(), name.encode())
        with self._lock:
            items = self._read()
            items[name] = {"n": _b64e(nonce), "c": _b64e(sealed)}
            self._write(items)

    def get(self, name: str) -> str | None:
        """The value, or None when there is no such secret."""
        self.check_name(name)
        entry = self._read().get(name)
        if entry is None:
            return None
        try:
            return self._aead.decrypt(_b64d(entry["n"]), _b64d(entry["c"]), name.encode()).decode()
        except (InvalidTag, KeyError, TypeError, ValueError):
            raise StoreError(f"secret {name!r} cannot be decrypted with this store key") from None

    def delete(self, name: str) -> bool:
        self.check_name(name)
        with self._lock:
            items = self._read()
            if name not in items:
                return False
            del items[name]
            self._write(items)
            return True

    def names(self) -> list[str]:
        return sorted(self._read())

    def __repr__(self) -> str:
        return f"LocalStore({str(self.dir)!r})"
