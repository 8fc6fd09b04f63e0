"""The canonical form of a policy set, and its fingerprint.

The fingerprint is what a policy set *means*, not how its files look: comments,
key order, quoting, indentation and whitespace inside expressions (outside
string literals) do not change it; any change to a name, mode, selector, rule,
reason, order, allowed internal range or injected credential does. Secret
references are hashed in the canonical form, so the form can be shared without
naming the secrets. Decisions carry the fingerprint of the set that made them
(``policy_fingerprint`` in audit events), next to ``policy_version`` (the hash of
the files' bytes), so drift between gateways shows even when files were only
reformatted, and a formatting-only change shows as one.

Pure functions; no I/O.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from gateway.secrets.refs import RefError, SecretRef, parse_ref, parse_template

POLICY_KEY_ORDER = ("apiVersion", "kind", "name", "description", "mode", "selector", "rules")
RULE_KEY_ORDER = ("name", "description", "action", "when", "reason", "allow_internal", "inject")
INJECT_KEY_ORDER = ("headers", "placeholders", "allow_plaintext")


def normalize_expr(text: str) -> str:
    """CEL text with every run of whitespace outside string literals collapsed to
    one space (and none at the ends). String literals are kept byte for byte:
    single, double and triple quotes, with backslash escapes (raw strings keep
    their backslashes, and a quote after a backslash still does not end them)."""
    out: list[str] = []
    i, n = 0, len(text)
    pending_space = False
    while i < n:
        c = text[i]
        if c in " \t\r\n\f\v":
            pending_space = True
            i += 1
            continue
        if pending_space and out:
            out.append(" ")
        pending_space = False
        if c in "'\"":
            q = text[i:i + 3] if text[i:i + 3] in ("'''", '"""') else c
            j = i + len(q)
            while j < n:
                if text[j] == "\\":
                    j += 2
                    continue
                if text.startswith(q, j):
                    j += len(q)
                    break
                j += 1
            out.append(text[i:j])
            i = j
            continue
        out.append(c)
        i += 1
    return "".join(out)


def hash_ref(ref: SecretRef | str) -> str:
    return "sha256:" + hashlib.sha256(str(ref).encode()).hexdigest()[:16]


def _canonical_template(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        t = parse_template(text)
    except RefError:
        return text  # the loader reports it; the form stays deterministic
    return "".join(f"${{{hash_ref(p)}}}" if isinstance(p, SecretRef) else p.replace("${", "$${") for p in t.parts)


def _canonical_ref(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return hash_ref(parse_ref(text))
    except RefError:
        return text


def _expr(v: Any) -> Any:
    if v is True:
        return "true"
    if v is False:
        return "false"
    return normalize_expr(v) if isinstance(v, str) else v


def canonical_policy(doc: dict) -> dict:
    """One policy document (as parsed YAML) in canonical form: defaults made
    explicit, expressions whitespace-normalised, secret references hashed, keys
    in a fixed order (JSON dumps it with sort_keys for hashing anyway)."""
    out: dict[str, Any] = {
        "apiVersion": doc.get("apiVersion", "egress/v1"),
        "kind": doc.get("kind", "Policy"),
        "name": doc.get("name"),
        "mode": doc.get("mode", "enforce"),
        "selector": _expr(doc.get("selector")),
    }
    if doc.get("description") is not None:
        out["description"] = doc["description"]
    rules = []
    for i, r in enumerate(doc.get("rules") or [], 1):
        if not isinstance(r, dict):
            rules.append(r)
            continue
        cr: dict[str, Any] = {"name": r.get("name", f"rule-{i}"), "action": r.get("action"),
                              "when": _expr(r.get("when"))}
        for k in ("description", "reason"):
            if r.get(k) is not None:
                cr[k] = r[k]
        if r.get("allow_internal"):
            cr["allow_internal"] = list(r["allow_internal"])
        inj = r.get("inject")
        if isinstance(inj, dict):
            ci: dict[str, Any] = {}
            if inj.get("headers"):
                ci["headers"] = {str(k).lower(): _canonical_template(v) for k, v in inj["headers"].items()}
            if inj.get("placeholders"):
                ci["placeholders"] = {str(k): _canonical_ref(v) for k, v in inj["placeholders"].items()}
            ci["allow_plaintext"] = bool(inj.get("allow_plaintext", False))
            cr["inject"] = ci
        rules.append(cr)
    out["rules"] = rules
    return out


def fingerprint_of(canonical_policies: list[dict]) -> str:
    """``fp:`` + 16 hex digits of SHA-256 over the canonical policies, in set order
    (order decides precedence, so it is part of the meaning)."""
    data = json.dumps(canonical_policies, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "fp:" + hashlib.sha256(data.encode()).hexdigest()[:16]
