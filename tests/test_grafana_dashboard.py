"""docs/grafana-dashboard.json against the metrics the gateway really exposes.

The exposition comes from a real ``gateway.metrics.Metrics`` with every source
attached (audit spool and shipper, identity service, secret stats, leases) and
every labelled counter incremented once, so each series renders. Every PromQL
expression in the dashboard (panel targets, annotations, template variables) is
checked against it: metric names, label matchers, ``by (...)`` labels, legend
labels, rate() only on counters, histogram_quantile() only on ``_bucket``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.audit.shipper import Delivery, Shipper
from gateway.audit.sinks.base import Sink
from gateway.audit.spool import Spool
from gateway.identity import IdentityService
from gateway.metrics import Metrics
from gateway.secrets.store import StoreStats

DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana-dashboard.json"

# Labels Prometheus attaches at scrape time (never in the exposition itself).
TARGET_LABELS = frozenset({"instance", "job"})
# Histograms recomputed at scrape time from a bounded window of recent observations
# (see gateway/metrics.py): their buckets can shrink, so rate()/increase() on them is wrong.
WINDOW_HISTOGRAMS = frozenset({"egress_secret_fetch_duration_seconds"})
# Families deliberately not on the dashboard (none yet; add with a reason).
NOT_ON_DASHBOARD: frozenset[str] = frozenset()

ROWS = ["Traffic & decisions", "Latency", "Bytes", "Audit", "Policy", "Secrets", "Identity"]
RANGES = {"$__rate_interval", "$__range"}
AGGREGATIONS = r"sum|avg|min|max|count|group|stddev|stdvar|topk|bottomk|quantile|count_values|limitk"

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_SELECTOR = re.compile(r"(?<![\w:])(egress_[A-Za-z0-9_:]*)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")


class _NullSink(Sink):
    kind = "null"

    def send(self, batch) -> None:
        pass


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> dict[str, tuple[str, str, frozenset[str]]]:
    """sample name -> (family name, family type, labels) from a populated Metrics()."""
    tmp = tmp_path_factory.mktemp("dashboard")
    m = Metrics()
    m.count("t1", "allow", "allowed", "a1", "r1")
    m.count("t1", "deny", "default_deny", "a1", None)
    m.observe_decision(2e-5)
    m.observe_completion("t1", 200, 10, 20, 0.01, 0.02)
    m.set_policy("v", 1)
    m.identity_failures.labels("invalid_token").inc()
    m.reloads.labels("success", "startup").inc()
    m.reloads.labels("failure", "api").inc()
    m.reflections.labels("body").inc()
    m.audit_failures.inc()
    spool = Spool(tmp / "spool", keeper=False)
    try:
        shipper = Shipper(spool, [(_NullSink("siem"), Delivery())])  # workers not started
        spool.write({"event": "test"})
        m.audit = (spool, shipper)
        m.identity = IdentityService(tmp / "state")
        m.secret_stats = StoreStats(hits=3, misses=1, fetch_seconds=[0.002, 0.03])
        m.lease_count = lambda: 0
        text = m.render().decode()
    finally:
        spool.close()
    out: dict[str, tuple[str, str, set[str]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.endswith("_created"):  # prometheus_client's counter creation times: not for dashboards
                continue
            out.setdefault(s.name, (fam.name, fam.type, set()))[2].update(s.labels)
    return {k: (f, t, frozenset(labels)) for k, (f, t, labels) in out.items()}


@pytest.fixture(scope="module")
def dash() -> dict:
    return json.loads(DASHBOARD.read_text())


# -- helpers ------------------------------------------------------------------------------

def _all_panels(d: dict) -> list[dict]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels") or [])  # collapsed rows keep their panels inside
    return out


def _var_query(v: dict) -> str:
    q = v.get("query")
    return q.get("query", "") if isinstance(q, dict) else (q or "")


def _exprs(d: dict) -> list[tuple[str, str, str]]:
    """(where, expr, legendFormat) for every panel target and annotation query."""
    out = []
    for p in _all_panels(d):
        for t in p.get("targets") or []:
            out.append((f"panel {p['id']} {p.get('title')!r} {t.get('refId')}", t.get("expr", ""),
                        t.get("legendFormat", "")))
    for a in d["annotations"]["list"]:
        if a.get("expr"):
            out.append((f"annotation {a['name']!r}", a["expr"], a.get("titleFormat", "")))
    return out


def _strip_strings(expr: str) -> str:
    """The expression with string literals blanked out (same length, so positions still match)."""
    return _STRING.sub(lambda m: '"' + " " * (len(m.group(0)) - 2) + '"', expr)


def _selectors(expr: str) -> list[tuple[str, dict[str, tuple[str, str]]]]:
    """(metric name, {label: (op, value)}) for each egress_* selector (names inside strings ignored)."""
    out = []
    # find names on the blanked text, read matchers from the original
    stripped = _strip_strings(expr)
    for m in _SELECTOR.finditer(stripped):
        matchers = {}
        if m.group(2):
            body = expr[m.start(2):]
            body = body[:_closing_brace(body) + 1]
            for lm in _MATCHER.finditer(body):
                matchers[lm.group(1)] = (lm.group(2), lm.group(3))
            leftover = _MATCHER.sub("", body[1:-1]).replace(",", "").strip()
            assert not leftover, f"unparsed label matcher text {leftover!r} in {expr!r}"
        out.append((m.group(1), matchers))
    return out


def _closing_brace(s: str) -> int:
    in_str = False
    for i, ch in enumerate(s):
        if ch == '"' and (i == 0 or s[i - 1] != "\\"):
            in_str = not in_str
        elif ch == "}" and not in_str:
            return i
    raise AssertionError(f"unclosed brace in {s!r}")


def _group(s: str, open_at: int) -> str:
    """The text inside the balanced parentheses opening at s[open_at]."""
    depth = 0
    for i in range(open_at, len(s)):
        if s[i] == "(":
            depth += 1
        elif s[i] == ")":
            depth -= 1
            if depth == 0:
                return s[open_at + 1:i]
    raise AssertionError(f"unbalanced parentheses in {s!r}")


def _group_before(s: str, close_at: int) -> str:
    depth = 0
    for i in range(close_at, -1, -1):
        if s[i] == ")":
            depth += 1
        elif s[i] == "(":
            depth -= 1
            if depth == 0:
                return s[i + 1:close_at]
    raise AssertionError(f"unbalanced parentheses in {s!r}")


def _labels_of(text: str, series) -> set[str]:
    labels = set(TARGET_LABELS)
    for name, _ in _selectors(text):
        if name in series:
            labels |= series[name][2]
    return labels


def _grouping_clauses(expr: str, series):
    """(keyword, labels, labels available to it) for every by/without/on/ignoring/group_* clause."""
    s = _strip_strings(expr)
    for m in _GROUPING.finditer(s):
        kw = m.group(1)
        labels = [x.strip() for x in m.group(2).split(",") if x.strip()]
        if kw in ("by", "without"):
            after = s[m.end():].lstrip()
            before = s[:m.start()].rstrip()
            if after.startswith("("):  # sum by (x) (body)
                body = _group(s, m.end() + (len(s[m.end():]) - len(after)))
            elif before.endswith(")"):  # sum(body) by (x)
                body = _group_before(s, len(before) - 1)
            else:
                raise AssertionError(f"cannot find the body of {m.group(0)!r} in {expr!r}")
            yield kw, labels, _labels_of(body, series)
        else:
            yield kw, labels, _labels_of(s, series)


# -- the file -----------------------------------------------------------------------------

def test_dashboard_is_importable_json(dash):
    for key in ("__inputs", "__requires", "annotations", "panels", "templating", "title", "uid", "time",
                "schemaVersion"):
        assert key in dash, key
    assert dash["schemaVersion"] == 39
    assert dash["id"] is None, "an exported dashboard must not carry a database id"
    inputs = {i["name"]: i for i in dash["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource" and inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    required = {(r["type"], r["id"]) for r in dash["__requires"]}
    assert ("datasource", "prometheus") in required
    for p in _all_panels(dash):
        if p["type"] != "row":
            assert ("panel", p["type"]) in required, f"panel type {p['type']} missing from __requires"


def test_panel_ids_unique_and_layout_sane(dash):
    panels = _all_panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells: dict[tuple[int, int], int] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and 0 <= g["x"] and g["x"] + g["w"] <= 24, (p["title"], g)
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panels {cells[(x, y)]} and {p['id']} overlap"
                cells[(x, y)] = p["id"]


def test_rows_and_descriptions(dash):
    rows = [p for p in dash["panels"] if p["type"] == "row"]
    assert [r["title"] for r in rows] == ROWS
    order = [p["type"] for p in dash["panels"]]
    for i, t in enumerate(order):
        if t == "row":
            nested = dash["panels"][i]["panels"]
            assert nested or (i + 1 < len(order) and order[i + 1] != "row"), f"empty row {dash['panels'][i]}"
    for p in _all_panels(dash):
        if p["type"] != "row":
            assert p.get("description", "").strip(), f"panel {p['title']!r} has no description"
            assert p.get("targets"), f"panel {p['title']!r} has no query"


def test_every_datasource_is_the_import_input(dash):
    names = {f"${{{i['name']}}}" for i in dash["__inputs"]}

    def walk(o):
        if isinstance(o, dict):
            ds = o.get("datasource")
            if isinstance(ds, dict) and ds.get("type") == "prometheus":
                assert ds.get("uid") in names, ds
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    walk(dash)
    for p in _all_panels(dash):
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]


def test_template_variables(dash, series):
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert {"tenant", "instance"} <= set(variables)
    tenant = variables["tenant"]
    assert tenant["multi"] and tenant["includeAll"]
    assert re.fullmatch(r'label_values\(egress_requests_total(\{[^}]*\})?\s*,\s*tenant\)', _var_query(tenant)), \
        f"tenant variable: {_var_query(tenant)!r}"
    for v in variables.values():
        if v["type"] != "query":
            continue
        q = _var_query(v)
        assert v.get("definition", q) == q, f"variable {v['name']}: definition and query disagree"
        m = re.fullmatch(r"\s*label_values\((.*?)\s*,\s*([A-Za-z_]\w*)\s*\)\s*", q) or \
            re.fullmatch(r"\s*label_values\(\s*([A-Za-z_]\w*)\s*\)\s*", q)
        assert m, f"variable {v['name']}: unrecognised query {q!r}"
        if m.lastindex == 2:
            sels = _selectors(m.group(1))
            assert len(sels) == 1, q
            name, matchers = sels[0]
            assert name in series, f"variable {v['name']}: {name} is not exposed"
            have = series[name][2] | TARGET_LABELS
            assert m.group(2) in have, f"variable {v['name']}: {name} has no label {m.group(2)}"
            assert set(matchers) <= have, f"variable {v['name']}: {name} has no label(s) {set(matchers) - have}"


# -- the queries --------------------------------------------------------------------------

def test_queries_are_well_formed(dash):
    for where, expr, _ in _exprs(dash):
        assert expr.strip(), f"{where}: empty expr"
        assert '"' not in _STRING.sub("", expr), f"{where}: unterminated string in {expr!r}"
        s = _strip_strings(expr)
        assert s.count("(") == s.count(")") and s.count("{") == s.count("}"), \
            f"{where}: unbalanced {expr!r}"
        assert s.count("[") == s.count("]"), f"{where}: unbalanced {expr!r}"
        for window in re.findall(r"\[([^\]]*)\]", s):
            assert window in RANGES, f"{where}: range [{window}] (use $__rate_interval, or $__range for totals)"
        assert _selectors(expr), f"{where}: no egress_ metric in {expr!r}"


def test_metric_names_exist(dash, series):
    for where, expr, _ in _exprs(dash):
        for name, _ in _selectors(expr):
            assert name in series, (f"{where}: {name} is not in the exposition (histograms: use _bucket/_sum/"
                                    f"_count; counters end in _total)")


def test_label_matchers_exist(dash, series):
    for where, expr, _ in _exprs(dash):
        for name, matchers in _selectors(expr):
            have = series[name][2] | TARGET_LABELS
            assert set(matchers) <= have, f"{where}: {name} has no label(s) {set(matchers) - have}"


def test_grouping_labels_exist(dash, series):
    for where, expr, _ in _exprs(dash):
        for kw, labels, have in _grouping_clauses(expr, series):
            assert set(labels) <= have, f"{where}: {kw} ({', '.join(labels)}) uses {set(labels) - have}"


def test_legend_labels_survive_the_query(dash, series):
    for where, expr, legend in _exprs(dash):
        used = set(re.findall(r"\{\{\s*([A-Za-z_]\w*)\s*\}\}", legend))
        if not used:
            continue
        s = _strip_strings(expr)
        clauses = list(_grouping_clauses(expr, series))
        if any(kw == "without" for kw, _, _ in clauses):
            continue
        by = {lab for kw, labels, _ in clauses if kw == "by" for lab in labels}
        if by:
            allowed = by
        elif re.search(rf"\b({AGGREGATIONS})\s*\(", s):
            allowed = set()  # aggregated without by(): no labels left
        else:
            allowed = _labels_of(expr, series)
        assert used <= allowed, f"{where}: legend uses {used - allowed}, which {expr!r} does not return"


def test_rate_only_on_counters(dash, series):
    for where, expr, _ in _exprs(dash):
        s = _strip_strings(expr)
        for fn, name in re.findall(r"\b(rate|irate|increase)\s*\(\s*(egress_[A-Za-z0-9_:]*)", s):
            family, ftype, _ = series[name]
            assert ftype in ("counter", "histogram"), f"{where}: {fn}() of {name}, a {ftype}"
            assert family not in WINDOW_HISTOGRAMS, f"{where}: {fn}() of {name}, a sliding-window histogram"


def test_histogram_quantile_uses_buckets_by_le(dash, series):
    seen = 0
    for where, expr, _ in _exprs(dash):
        s = _strip_strings(expr)
        for m in re.finditer(r"\bhistogram_quantile\s*\(", s):
            seen += 1
            body = _group(s, m.end() - 1)
            q = float(body.split(",", 1)[0])
            assert 0 < q < 1, f"{where}: quantile {q}"
            names = [n for n, _ in _selectors(body)]
            assert names and all(n.endswith("_bucket") and series[n][1] == "histogram" for n in names), \
                f"{where}: histogram_quantile over {names}"
            for kw, labels, _ in _grouping_clauses(body, series):
                if kw == "by":
                    assert "le" in labels, f"{where}: histogram_quantile needs by (le, ...)"
    assert seen >= 4  # decision, upstream, total, secret fetch


def test_filters_follow_the_template_variables(dash, series):
    for where, expr, _ in _exprs(dash):
        for name, matchers in _selectors(expr):
            assert matchers.get("instance") == ("=~", "$instance"), f"{where}: {name} not filtered by $instance"
            if "tenant" in series[name][2]:
                assert matchers.get("tenant") == ("=~", "$tenant"), f"{where}: {name} not filtered by $tenant"
            for label, (op, value) in matchers.items():
                if "$" in value:
                    assert op == "=~", f"{where}: multi-value variable in {label}{op}{value!r} needs =~"


def test_every_exposed_family_is_on_the_dashboard(dash, series):
    used = {series[n][0] for _, expr, _ in _exprs(dash) for n, _ in _selectors(expr) if n in series}
    exposed = {fam for fam, _, _ in series.values()}
    missing = exposed - used - NOT_ON_DASHBOARD
    assert not missing, f"metrics not on the dashboard: {sorted(missing)} (add a panel or list in NOT_ON_DASHBOARD)"


def test_alert_worthy_panels_turn_red(dash):
    def red(p) -> bool:
        d = p["fieldConfig"]["defaults"]
        steps = d.get("thresholds", {}).get("steps", [])
        colours = {s["color"] for s in steps} | {o.get("color") for m in d.get("mappings", [])
                                                  for o in m.get("options", {}).values()}
        overrides = json.dumps(p["fieldConfig"].get("overrides", []))
        return "red" in colours or '"fixedColor": "red"' in overrides

    alerting = {
        "spool full": lambda e: "egress_audit_spool_full" in e,
        "spool not writable": lambda e: "egress_audit_spool_writable" in e,
        "sink down": lambda e: "egress_audit_sink_up" in e,
        "audit write failures": lambda e: "egress_audit_write_failures_total" in e,
        "reload failures": lambda e: "egress_policy_reloads_total" in e and 'outcome="failure"' in e,
    }
    for what, match in alerting.items():
        panels = [p for p in _all_panels(dash) if any(match(t.get("expr", "")) for t in p.get("targets") or [])]
        assert panels, f"no panel for {what}"
        for p in panels:
            assert red(p), f"panel {p['title']!r} ({what}) has no red threshold"
