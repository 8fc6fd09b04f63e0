"""The ``audit:`` section of the gateway configuration, and building its sinks.

Example (docs/audit.md has every key)::

    audit:
      dir: /var/lib/egress/audit      # the spool (default <state dir>/audit)
      max_bytes: 1GiB                 # undelivered backlog bound
      on_full: deny                   # or drop_oldest
      fsync: interval                 # interval | always | never
      query_string: redact            # redact | drop | keep
      sinks:
        - name: archive
          type: file
          path: /var/log/egress/audit.jsonl
          max_bytes: 100MiB
          rotate_interval: daily
        - name: siem
          type: syslog
          format: ocsf
          address: siem.internal:6514
          protocol: tls
          ca: /etc/egress/siem-ca.pem
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from gateway.audit.shipper import Delivery
from gateway.audit.sinks.base import FORMATS, Sink

SINK_TYPES = {
    "file": ("gateway.audit.sinks.file", "FileSink"),
    "syslog": ("gateway.audit.sinks.syslog", "SyslogSink"),
    "relp": ("gateway.audit.sinks.relp", "RelpSink"),
    "splunk_hec": ("gateway.audit.sinks.http", "HecSink"),
    "elasticsearch": ("gateway.audit.sinks.http", "BulkSink"),
    "opensearch": ("gateway.audit.sinks.http", "BulkSink"),
    "webhook": ("gateway.audit.sinks.http", "WebhookSink"),
}
QUERY_MODES = ("redact", "drop", "keep")
_SIZE_KEYS = ("segment_bytes", "max_bytes", "retain_bytes")
_DURATION_KEYS = ("fsync_interval", "retain_age")
_DELIVERY_KEYS = {f.name for f in fields(Delivery)}


def parse_size(v: Any) -> int:
    from gateway.audit.sinks.file import parse_size as p
    return p(v)


def parse_duration(v: Any) -> float:
    from gateway.audit.sinks.file import parse_duration as p
    return p(v)


@dataclass(frozen=True)
class AuditConfig:
    enabled: bool = True
    dir: str = ""  # default <state dir>/audit
    segment_bytes: int = 16 << 20
    max_bytes: int = 1 << 30
    on_full: str = "deny"
    fsync: str = "interval"
    fsync_interval: float = 1.0
    retain_bytes: int = 256 << 20
    retain_age: float = 7 * 86400.0
    query_string: str = "redact"
    sinks: tuple[dict, ...] = field(default_factory=tuple)

    @staticmethod
    def from_dict(raw: Any, base: Path | None = None) -> "AuditConfig":
        """Validate a mapping from a config file; relative paths are relative to ``base``."""
        if raw is None:
            return AuditConfig()
        if not isinstance(raw, dict):
            raise ValueError("audit: expected a mapping (see docs/audit.md)")
        known = {f.name for f in fields(AuditConfig)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"audit: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        values: dict[str, Any] = {}
        for k, v in raw.items():
            try:
                if k in _SIZE_KEYS:
                    values[k] = parse_size(v)
                elif k in _DURATION_KEYS:
                    values[k] = parse_duration(v)
                elif k == "enabled":
                    if not isinstance(v, bool):
                        raise ValueError("expected true or false")
                    values[k] = v
                elif k == "sinks":
                    if not isinstance(v, list) or not all(isinstance(s, dict) for s in v):
                        raise ValueError("expected a list of sink mappings (each with name and type)")
                    values[k] = tuple(_sink_paths(dict(s), base) for s in v)
                else:
                    if not isinstance(v, str):
                        raise ValueError("expected a string")
                    values[k] = str((base / v).resolve()) if k == "dir" and base and not Path(v).is_absolute() else v
            except ValueError as e:
                msg = str(e)
                raise ValueError(msg if msg.startswith("audit") else f"audit.{k}: {msg}") from None
        cfg = AuditConfig(**values)
        cfg.validate()
        return cfg

    def validate(self) -> "AuditConfig":
        from gateway.audit.spool import FSYNC_MODES, ON_FULL
        if self.on_full not in ON_FULL:
            raise ValueError(f"audit.on_full: use one of {', '.join(ON_FULL)}, got {self.on_full!r}")
        if self.fsync not in FSYNC_MODES:
            raise ValueError(f"audit.fsync: use one of {', '.join(FSYNC_MODES)}, got {self.fsync!r}")
        if self.query_string not in QUERY_MODES:
            raise ValueError(f"audit.query_string: use one of {', '.join(QUERY_MODES)}, got {self.query_string!r}")
        if self.segment_bytes < 4096:
            raise ValueError("audit.segment_bytes: at least 4KiB")
        if self.max_bytes < self.segment_bytes:
            raise ValueError("audit.max_bytes: must be at least segment_bytes")
        names = set()
        for i, s in enumerate(self.sinks):
            name, typ = s.get("name"), s.get("type")
            if not isinstance(name, str) or not name:
                raise ValueError(f"audit.sinks[{i}]: every sink needs a name (used for its delivery position)")
            if name in names:
                raise ValueError(f"audit.sinks: two sinks are named {name!r}")
            names.add(name)
            if typ not in SINK_TYPES:
                raise ValueError(f"audit.sinks.{name}: type must be one of {', '.join(SINK_TYPES)}, got {typ!r}")
            if s.get("format", "json") not in FORMATS:
                raise ValueError(f"audit.sinks.{name}: format must be one of {', '.join(FORMATS)}")
        return self

    def spool_dir(self, state_dir: str | Path) -> Path:
        return Path(self.dir) if self.dir else Path(state_dir) / "audit"


def _sink_paths(s: dict, base: Path | None) -> dict:
    if base is not None:
        for k in ("path", "ca", "cert", "key"):
            v = s.get(k)
            if isinstance(v, str) and v and not Path(v).is_absolute():
                s[k] = str((base / v).resolve())
    return s


def build_sinks(cfg: AuditConfig, resolve: Callable[[str], str]) -> list[tuple[Sink, Delivery]]:
    """Construct every configured sink (raises ValueError naming the sink on bad options)."""
    import importlib
    out = []
    for s in cfg.sinks:
        opts = dict(s)
        name, typ, fmt = opts.pop("name"), opts.pop("type"), opts.pop("format", "json")
        dkw: dict[str, Any] = {}
        for k in list(opts):
            if k in _DELIVERY_KEYS:
                v = opts.pop(k)
                try:
                    if k == "batch_bytes":
                        dkw[k] = parse_size(v)
                    elif k == "batch_events":
                        if not isinstance(v, int) or v < 1:
                            raise ValueError("expected a positive integer")
                        dkw[k] = v
                    else:
                        dkw[k] = parse_duration(v)
                except ValueError as e:
                    raise ValueError(f"audit.sinks.{name}.{k}: {e}") from None
        mod, cls = SINK_TYPES[typ]
        klass = getattr(importlib.import_module(mod), cls)
        sink = klass.from_config(name, fmt, opts, resolve)
        if typ in ("elasticsearch", "opensearch"):
            sink.kind = typ
        out.append((sink, Delivery(**dkw)))
    return out
