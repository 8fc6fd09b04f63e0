"""Audit events in SIEM formats (pure functions): OCSF HTTP Activity (class
4002, schema 1.3.0) and Elastic Common Schema (ECS 8.11). The input is one of
our own decision events (gateway.runtime.Gateway.record); nothing is added that
the event does not hold, so secrets, query strings and header values stay out.
Events that are not decisions are returned unchanged by ``convert``.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

PRODUCT = {"name": "egress-gateway", "vendor_name": "egress-gateway"}
OCSF_VERSION = "1.3.0"
ECS_VERSION = "8.11.0"

# OCSF 1.3.0 HTTP Activity activity_id by method; others are 99 (Other) with activity_name.
OCSF_ACTIVITY = {"CONNECT": 1, "DELETE": 2, "GET": 3, "HEAD": 4, "OPTIONS": 5, "POST": 6, "PUT": 7, "TRACE": 8}


def _epoch_ms(ts: str) -> int:
    return int(_dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1000)


def _first_ip(ev: dict) -> str:
    if ev.get("dial"):
        return ev["dial"]
    ips = (ev.get("destination") or {}).get("ips") or []
    return ips[0] if ips else ""


def to_ocsf(ev: dict) -> dict[str, Any]:
    req = ev.get("request") or {}
    method = (req.get("method") or "").upper()
    activity = OCSF_ACTIVITY.get(method, 99 if method else 0)
    allowed = ev.get("decision") == "allow"
    p = ev.get("principal") or {}
    out: dict[str, Any] = {
        "category_uid": 4, "category_name": "Network Activity",
        "class_uid": 4002, "class_name": "HTTP Activity",
        "activity_id": activity, "activity_name": method.title() if method else "Unknown",
        "type_uid": 4002 * 100 + activity,
        "time": _epoch_ms(ev["ts"]),
        "severity_id": 1 if allowed else 3, "severity": "Informational" if allowed else "Medium",
        "action_id": 1 if allowed else 2, "action": "Allowed" if allowed else "Denied",
        "disposition_id": 1 if allowed else 2, "disposition": "Allowed" if allowed else "Blocked",
        "status_id": 1 if allowed else 2, "status": "Success" if allowed else "Failure",
        "status_detail": ev.get("reason", ""),
        "metadata": {"version": OCSF_VERSION, "product": dict(PRODUCT), "uid": ev.get("request_id", ""),
                     "log_name": "egress-decisions"},
        "http_request": {"http_method": method,
                         "url": {"hostname": req.get("host", ""), "path": req.get("path", ""),
                                 "port": req.get("port"), "scheme": req.get("scheme", "")}},
        "dst_endpoint": {"hostname": req.get("host", ""), "ip": _first_ip(ev), "port": req.get("port")},
        "src_endpoint": {"ip": ev.get("source", "")},
        "firewall_rule": {"name": ev.get("rule") or "default-deny", "uid": ev.get("policy_version", ""),
                          "desc": ev.get("reason", "")},
        "unmapped": {"code": ev.get("code"), "mode": req.get("mode"), "sni": req.get("sni")},
    }
    if p:
        out["actor"] = {"user": {"name": p.get("agent", ""), "uid": p.get("token_id", ""),
                                 "org": {"name": p.get("tenant", "")}},
                        "session": {"uid": p.get("session", "")}}
        out["unmapped"]["labels"] = p.get("labels", {})
    for k in ("shadow", "secrets", "identity_error", "decision_us"):
        if k in ev:
            out["unmapped"][k] = ev[k]
    return out


def to_ecs(ev: dict) -> dict[str, Any]:
    req = ev.get("request") or {}
    allowed = ev.get("decision") == "allow"
    p = ev.get("principal") or {}
    out: dict[str, Any] = {
        "@timestamp": ev["ts"],
        "ecs": {"version": ECS_VERSION},
        "event": {"kind": "event", "category": ["network", "web"],
                  "type": ["connection", "allowed" if allowed else "denied"],
                  "action": "egress-decision", "outcome": "success" if allowed else "failure",
                  "id": ev.get("request_id", ""), "reason": ev.get("reason", ""), "code": ev.get("code", "")},
        "observer": {"vendor": PRODUCT["vendor_name"], "product": PRODUCT["name"], "type": "proxy"},
        "url": {"domain": req.get("host", ""), "path": req.get("path", ""), "port": req.get("port"),
                "scheme": req.get("scheme", "")},
        "http": {"request": {"method": req.get("method", "")}},
        "destination": {"domain": req.get("host", ""), "ip": _first_ip(ev) or None, "port": req.get("port")},
        "source": {"ip": ev.get("source") or None},
        "rule": {"name": ev.get("rule") or "default-deny", "ruleset": ev.get("policy_version", ""),
                 "description": ev.get("reason", "")},
    }
    if p:
        out["user"] = {"name": p.get("agent", ""), "id": p.get("token_id", "")}
        out["organization"] = {"name": p.get("tenant", "")}
        out["labels"] = {k.replace(".", "_"): v for k, v in (p.get("labels") or {}).items()}
        if p.get("session"):
            out["labels"]["session"] = p["session"]
    return out


def convert(ev: dict, fmt: str) -> dict:
    """``json`` (unchanged), ``ocsf`` or ``ecs``; non-decision events pass through."""
    if fmt == "json" or ev.get("event") != "decision":
        return ev
    if fmt == "ocsf":
        return to_ocsf(ev)
    if fmt == "ecs":
        return to_ecs(ev)
    raise ValueError(f"unknown format {fmt!r} (use json, ocsf or ecs)")
