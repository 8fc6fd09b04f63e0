"""Gateway configuration: defaults, an optional YAML file, then command-line flags.

Every setting has a sane default so ``egress gateway run`` works with no file:
the default policy bundle, state under ``.state``, the proxy on 127.0.0.1:8080
and the admin API on 127.0.0.1:8081. Unknown keys in a file are errors.

Example file (docs/operations.md has all keys)::

    listen: 127.0.0.1:8080
    modes: [explicit]          # explicit and/or transparent (transparent@PORT)
    policies: policies/default
    state_dir: /var/lib/egress
    admin: 127.0.0.1:8081      # "" turns the admin API off
    hosts:                     # static name -> address overrides
      billing.internal: 10.20.0.5
    upstream_ca: [/etc/egress/corp-ca.pem]   # added to the system trust store
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_POLICIES = REPO_ROOT / "policies" / "default"
MODES = ("explicit", "transparent")


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the setting."""


def parse_hostport(value: str, what: str) -> tuple[str, int]:
    v = value.strip()
    if v.startswith("["):
        host, _, rest = v[1:].partition("]")
        port_s = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_s = v.rpartition(":")
    if not host or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ConfigError(f"{what}: expected HOST:PORT (e.g. 127.0.0.1:8080), got {value!r}")
    return host, int(port_s)


@dataclass(frozen=True)
class ModeSpec:
    kind: str  # explicit | transparent
    host: str
    port: int

    def mitmproxy_mode(self) -> str:
        name = "regular" if self.kind == "explicit" else "transparent"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{name}@{host}:{self.port}"


@dataclass(frozen=True)
class GatewayConfig:
    listen: str = "127.0.0.1:8080"
    modes: tuple[str, ...] = ("explicit",)
    policies: str = str(DEFAULT_POLICIES)
    state_dir: str = ".state"
    admin: str = "127.0.0.1:8081"
    hosts: dict[str, tuple[str, ...]] = field(default_factory=dict)
    upstream_ca: tuple[str, ...] = ()
    audit: "AuditConfig" = field(default_factory=lambda: _audit_default())  # gateway.audit.config
    reload_interval: float = 2.0  # seconds between policy directory checks; 0 = off
    engine: str = "rust"  # rust | python
    self_addresses: tuple[str, ...] = ()  # the gateway's own addresses (never reachable)
    vault: dict = field(default_factory=dict)  # gateway.secrets.vault.VaultConfig settings (file only)

    @property
    def audit_dir(self) -> Path:
        """The audit spool directory (default <state dir>/audit)."""
        return self.audit.spool_dir(self.state_dir)

    def mode_specs(self) -> list[ModeSpec]:
        """``explicit`` listens on ``listen``; ``transparent`` on ``listen``'s host
        and the next port, unless written as ``transparent@HOST:PORT``."""
        host, port = parse_hostport(self.listen, "listen")
        specs = []
        for i, m in enumerate(self.modes):
            kind, _, where = m.partition("@")
            if kind not in MODES:
                raise ConfigError(f"modes: unknown mode {kind!r} (use explicit or transparent)")
            if where:
                h, p = parse_hostport(where, f"modes[{i}]")
            else:
                h, p = host, port + (1 if kind == "transparent" and "explicit" in
                                     [x.partition('@')[0] for x in self.modes] else 0)
            specs.append(ModeSpec(kind, h, p))
        return specs

    def validate(self) -> "GatewayConfig":
        self.mode_specs()
        if self.admin:
            parse_hostport(self.admin, "admin")
        if self.engine not in ("rust", "python"):
            raise ConfigError(f"engine: must be rust or python, got {self.engine!r}")
        if not Path(self.policies).is_dir():
            raise ConfigError(f"policies: {self.policies} is not a directory")
        for ca in self.upstream_ca:
            if not Path(ca).is_file():
                raise ConfigError(f"upstream_ca: {ca} does not exist")
        for name, addrs in self.hosts.items():
            for a in addrs:
                try:
                    ipaddress.ip_address(a)
                except ValueError:
                    raise ConfigError(f"hosts: {name} -> {a!r} is not an IP address") from None
        for a in self.self_addresses:
            try:
                ipaddress.ip_address(a)
            except ValueError:
                raise ConfigError(f"self_addresses: {a!r} is not an IP address") from None
        if self.reload_interval < 0:
            raise ConfigError("reload_interval: must be >= 0")
        return self


def _audit_default():
    from gateway.audit.config import AuditConfig
    return AuditConfig()


def parse_host_overrides(items: list[str] | tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """``["name=1.2.3.4", "name=::1"]`` -> ``{"name": ("1.2.3.4", "::1")}``."""
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, addr = item.partition("=")
        if not sep or not name or not addr:
            raise ConfigError(f"--host: expected NAME=ADDRESS, got {item!r}")
        out.setdefault(name.strip().lower(), []).append(addr.strip())
    return {k: tuple(v) for k, v in out.items()}


def _as_tuple(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"{key}: expected a string or a list of strings")


def load_config(path: str | Path | None, **overrides: Any) -> GatewayConfig:
    """Defaults, then the file (if any), then non-None ``overrides``."""
    cfg = GatewayConfig()
    if path:
        p = Path(path)
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except OSError as e:
            raise ConfigError(f"config: cannot read {p}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config: {p} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config: {p} must hold a mapping of settings")
        known = {f.name for f in fields(GatewayConfig)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"config: unknown setting(s) {', '.join(unknown)} in {p} "
                              f"(known: {', '.join(sorted(known))})")
        values: dict[str, Any] = {}
        for k, v in raw.items():
            if k in ("modes", "upstream_ca", "self_addresses"):
                values[k] = _as_tuple(v, k)
            elif k == "hosts":
                if not isinstance(v, dict):
                    raise ConfigError("hosts: expected a mapping NAME: ADDRESS or NAME: [ADDRESSES]")
                values[k] = {str(n).lower(): _as_tuple(a, f"hosts.{n}") for n, a in v.items()}
            elif k == "vault":
                from gateway.secrets.vault import VaultConfig
                known_v = {f.name for f in fields(VaultConfig)}
                if not isinstance(v, dict) or set(v) - known_v:
                    raise ConfigError(f"vault: expected a mapping with keys among {', '.join(sorted(known_v))}")
                if "kv_v1_mounts" in v:
                    v = dict(v, kv_v1_mounts=_as_tuple(v["kv_v1_mounts"], "vault.kv_v1_mounts"))
                values[k] = v
            elif k == "audit":
                from gateway.audit.config import AuditConfig
                try:
                    values[k] = AuditConfig.from_dict(v, base=p.parent)
                except ValueError as e:
                    raise ConfigError(str(e)) from None
            elif k == "reload_interval":
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    raise ConfigError("reload_interval: expected a number of seconds")
                values[k] = float(v)
            else:
                if not isinstance(v, str):
                    raise ConfigError(f"{k}: expected a string")
                values[k] = v
        # relative paths in a file are relative to the file
        for k in ("policies", "state_dir"):
            if values.get(k) and not os.path.isabs(values[k]):
                values[k] = str((p.parent / values[k]).resolve())
        if "upstream_ca" in values:
            values["upstream_ca"] = tuple(str((p.parent / c).resolve()) if not os.path.isabs(c) else c
                                          for c in values["upstream_ca"])
        cfg = replace(cfg, **values)
    extra_hosts = overrides.pop("extra_hosts", None)
    audit_dir = overrides.pop("audit", None)
    if audit_dir:
        cfg = replace(cfg, audit=replace(cfg.audit, dir=str(audit_dir)))
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if extra_hosts:
        merged = dict(cfg.hosts)
        merged.update(extra_hosts)
        cfg = replace(cfg, hosts=merged)
    return cfg.validate()
