"""HTTP sinks (Splunk HEC, Elasticsearch/OpenSearch _bulk, NDJSON webhook) against
the in-repo receivers of tests.support.siem, over HTTP and HTTPS."""

from __future__ import annotations

import base64
import datetime as _dt
import email.utils
import gzip
import json
import socket
import time
import uuid

import pytest
import urllib3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.audit.sinks.base import DeliveryError, Event, render
from gateway.audit.sinks.http import (BulkSink, HecSink, OpenSearchSink, SINK_CLASSES, WebhookSink,
                                      index_name_problem, retry_after_seconds)
from tests.conftest import register_secret
from tests.support.certs import make_test_ca
from tests.support.siem import (BulkReceiver, HecFormatError, HecReceiver, WebhookReceiver, make_events,
                                make_server_pki, parse_bulk_body, parse_hec_body)

HEC_TOKEN = register_secret("hec-" + uuid.uuid4().hex)
ES_PASSWORD = register_secret("espw-" + uuid.uuid4().hex)
ES_API_KEY = register_secret(base64.b64encode(f"id1:{uuid.uuid4().hex}".encode()).decode())
WEBHOOK_TOKEN = register_secret("wh-" + uuid.uuid4().hex)
WEBHOOK_HEADER = register_secret("hdr-" + uuid.uuid4().hex)
ALL_SECRETS = (HEC_TOKEN, ES_PASSWORD, ES_API_KEY, WEBHOOK_TOKEN, WEBHOOK_HEADER)

SECRET_VALUES = {"env:HEC_TOKEN": HEC_TOKEN, "local:siem/es-password": ES_PASSWORD,
                 "file:/run/secrets/es-api-key": ES_API_KEY, "vault:secret/siem#webhook": WEBHOOK_TOKEN,
                 "env:WEBHOOK_HEADER": WEBHOOK_HEADER}


class Resolver:
    def __init__(self, values=SECRET_VALUES):
        self.values = dict(values)
        self.calls: list[str] = []

    def __call__(self, ref: str) -> str:
        self.calls.append(ref)
        if ref not in self.values:
            raise KeyError(f"{ref}: not found")
        return self.values[ref]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("siem-pki")
    ca, leaf = make_server_pki(d / "good")
    wrong = make_test_ca(d / "wrong")
    return {"ca": str(ca.cert), "leaf": leaf, "wrong_ca": str(wrong.cert)}


@pytest.fixture(params=["http", "https"])
def scheme(request):
    return request.param


def _tls(pki, scheme):
    return pki["leaf"] if scheme == "https" else None


def _ca(pki, scheme):
    return {"ca": pki["ca"]} if scheme == "https" else {}


# --- one factory per sink kind: (receiver, sink) with matching credentials

def hec_pair(pki, scheme="http", fmt="json", receiver_kw=None, **opts):
    r = HecReceiver(HEC_TOKEN, tls=_tls(pki, scheme), **(receiver_kw or {}))
    o = {"url": r.url, "token": "env:HEC_TOKEN", **_ca(pki, scheme), **opts}
    return r, HecSink.from_config("splunk", fmt, o, Resolver())


def bulk_pair(pki, scheme="http", fmt="json", receiver_kw=None, auth="basic", flavor="elasticsearch", **opts):
    kw = dict(receiver_kw or {})
    o = {"url": None, **_ca(pki, scheme)}
    if auth == "basic":
        kw.update(username="egress", password=ES_PASSWORD)
        o.update(username="egress", password="local:siem/es-password")
    elif auth == "api_key":
        kw.update(api_key=ES_API_KEY)
        o.update(api_key="file:/run/secrets/es-api-key")
    r = BulkReceiver(tls=_tls(pki, scheme), flavor=flavor, **kw)
    o.update(url=r.url, **opts)
    return r, SINK_CLASSES[flavor].from_config("es", fmt, o, Resolver())


def webhook_pair(pki, scheme="http", fmt="json", receiver_kw=None, **opts):
    r = WebhookReceiver(path="/ingest", token=WEBHOOK_TOKEN, headers={"X-Tenant-Key": WEBHOOK_HEADER},
                        tls=_tls(pki, scheme), **(receiver_kw or {}))
    o = {"url": r.url + "/ingest", "token": "vault:secret/siem#webhook",
         "headers": {"X-Tenant-Key": "env:WEBHOOK_HEADER"}, **_ca(pki, scheme), **opts}
    return r, WebhookSink.from_config("hook", fmt, o, Resolver())


PAIRS = {"hec": hec_pair, "bulk": bulk_pair, "webhook": webhook_pair}


@pytest.fixture
def pairs():
    """Build (receiver, sink) pairs and close them at the end of the test."""
    made = []

    def make(kind, *a, **kw):
        r, s = PAIRS[kind](*a, **kw)
        made.append((r, s))
        return r, s

    yield make
    for r, s in made:
        s.close()
        r.close()


def _raises(sink, batch) -> DeliveryError:
    with pytest.raises(DeliveryError) as ei:
        sink.send(batch)
    err = ei.value
    for secret in ALL_SECRETS:
        assert secret not in str(err), "a secret leaked into a DeliveryError"
    return err


def _epoch(ts: str) -> float:
    return _dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


# --------------------------------------------------------------------------- delivery


@pytest.mark.parametrize("fmt", ["json", "ocsf", "ecs"])
def test_hec_delivers_documented_envelopes(pki, scheme, fmt, pairs):
    r, s = pairs("hec", pki, scheme, fmt, index="audit", host="gw-1", channel="0aeeac95-ac74-4aa9-b30d-6c4c0ac581ba")
    batch = make_events(5)
    s.send(batch)
    assert r.requests == 1
    assert r.unique_ids() == [e.id for e in batch] and r.duplicates() == 0
    sourcetype = {"json": "egress:audit", "ocsf": "egress:ocsf", "ecs": "egress:ecs"}[fmt]
    for ev, env in zip(batch, r.envelopes):
        assert env["time"] == pytest.approx(_epoch(ev.ts), abs=1e-6)
        assert (env["host"], env["source"], env["sourcetype"], env["index"]) == ("gw-1", "egress-gateway",
                                                                                 sourcetype, "audit")
        assert env["event"] == json.loads(render(ev, fmt))
    req = r.last_request
    assert req["path"] == "/services/collector/event"
    assert req["headers"]["authorization"] == f"Splunk {HEC_TOKEN}"
    assert req["headers"]["x-splunk-request-channel"] == "0aeeac95-ac74-4aa9-b30d-6c4c0ac581ba"
    assert r.channels == ["0aeeac95-ac74-4aa9-b30d-6c4c0ac581ba"] * 5
    assert s.describe() == f"splunk_hec {r.url}"


def test_hec_embeds_the_spool_line_verbatim_and_exact_time(pki):
    ev = Event(b'{"event":"decision","id":"e1","seq":7,"ts":"2026-11-24T01:02:03.456789Z","z":1.10}')
    s = HecSink("splunk", "json", url="http://127.0.0.1:9", token=HEC_TOKEN, host="h")
    body = s.build_body([ev, Event(b'{"id":"e2","seq":8}')])
    line1, line2 = body.splitlines()
    assert line1 == (b'{"time":1795482123.456789,"host":"h","source":"egress-gateway","sourcetype":"egress:audit",'
                     b'"event":' + ev.raw + b'}')
    assert b'"time"' not in line2 and line2.endswith(b'"event":{"id":"e2","seq":8}}')  # no ts: Splunk stamps it
    assert [e["event"]["id"] for e in parse_hec_body(body)] == ["e1", "e2"]
    s.close()


@pytest.mark.parametrize("kind", ["elasticsearch", "opensearch"])
@pytest.mark.parametrize("auth", ["basic", "api_key", None])
def test_bulk_delivers_create_actions_with_event_ids(pki, scheme, kind, auth, pairs):
    r, s = pairs("bulk", pki, scheme, "ecs", auth=auth, flavor=kind, index="egress-audit-%Y.%m.%d")
    batch = make_events(4)
    s.send(batch)
    assert s.kind == kind and isinstance(s, BulkSink)
    assert list(r.indices) == ["egress-audit-2026.11.24"]
    stored = r.indices["egress-audit-2026.11.24"]
    assert list(stored) == [e.id for e in batch]
    assert stored[batch[0].id] == json.loads(render(batch[0], "ecs"))
    req = r.last_request
    assert req["path"] == "/_bulk" and req["headers"]["content-type"] == "application/x-ndjson"
    if auth == "api_key":
        assert req["headers"]["authorization"] == f"ApiKey {ES_API_KEY}"
    elif auth == "basic":
        assert req["headers"]["authorization"].startswith("Basic ")
    else:
        assert "authorization" not in req["headers"]
    assert s.describe() == f"{kind} {r.url} index=egress-audit-%Y.%m.%d"


def test_bulk_index_date_comes_from_each_event(pki, pairs):
    r, s = pairs("bulk", pki, index="audit-%Y.%m.%d")
    a = make_events(1, ts="2026-12-31T23:59:59.999999Z")
    b = make_events(1, ts="2027-01-01T00:00:00.000001+00:00")
    c = make_events(1, ts="2027-01-01T01:30:00+02:00")  # 2026-12-31 in UTC
    s.send(a + b + c)
    assert {i: list(d) for i, d in r.indices.items()} == {"audit-2026.12.31": [a[0].id, c[0].id],
                                                          "audit-2027.01.01": [b[0].id]}


@pytest.mark.parametrize("fmt", ["json", "ocsf"])
def test_webhook_delivers_ndjson(pki, scheme, fmt, pairs):
    r, s = pairs("webhook", pki, scheme, fmt)
    batch = make_events(3)
    s.send(batch)
    assert r.events == [json.loads(render(e, fmt)) for e in batch]
    assert r.unique_ids() == [e.id for e in batch]
    h = r.last_request["headers"]
    assert h["content-type"] == "application/x-ndjson"
    assert h["authorization"] == f"Bearer {WEBHOOK_TOKEN}" and h["x-tenant-key"] == WEBHOOK_HEADER
    assert s.build_body(batch) == b"".join(render(e, fmt) + b"\n" for e in batch)


def test_webhook_header_templates_embed_references(pki, pairs):
    r, s = pairs("webhook", pki, receiver_kw={}, headers={"X-Tenant-Key": "${env:WEBHOOK_HEADER}",
                                                          "X-Sig": "v1 ${env:WEBHOOK_HEADER} $${x}"})
    s.send(make_events(1))
    h = r.last_request["headers"]
    assert h["x-tenant-key"] == WEBHOOK_HEADER and h["x-sig"] == f"v1 {WEBHOOK_HEADER} ${{x}}"


def test_webhook_posts_to_the_url_path_as_given_and_describes_the_origin_only():
    with WebhookReceiver(path="/hooks/k3y-in-path/") as r:
        s = WebhookSink.from_config("hook", "json", {"url": r.url + "/hooks/k3y-in-path/"}, Resolver())
        s.send(make_events(2))
        assert r.last_request["path"] == "/hooks/k3y-in-path/" and len(r.events) == 2
        assert s.describe() == f"webhook {r.url}"
        s.close()


@pytest.mark.parametrize("kind", list(PAIRS))
def test_gzip_compression(pki, kind, pairs):
    r, s = pairs(kind, pki, "https", compress=True)
    batch = make_events(20)
    s.send(batch)
    req = r.last_request
    assert req["headers"]["content-encoding"] == "gzip"
    assert req["bytes"] < req["decoded_bytes"] / 3
    assert r.unique_ids() == [e.id for e in batch]


@pytest.mark.parametrize("kind", list(PAIRS))
def test_empty_batch_sends_nothing(pki, kind, pairs):
    r, s = pairs(kind, pki)
    s.send([])
    assert r.requests == 0


@pytest.mark.parametrize("kind", list(PAIRS))
def test_close_then_send_reconnects(pki, kind, pairs):
    r, s = pairs(kind, pki, "https")
    s.send(make_events(1))
    s.close()
    s.send(make_events(1, start=2))
    assert len(r.unique_ids()) == 2


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("kind", list(PAIRS))
def test_wrong_ca_is_retryable(pki, kind, pairs):
    r, s = pairs(kind, pki, "https", ca=pki["wrong_ca"])
    err = _raises(s, make_events(2))
    assert err.retryable and "TLS" in str(err) and "certificate verify failed" in str(err)
    deadline = time.monotonic() + 5  # the receiver's side of the failed handshake ends on its own thread
    while r.tls_failures < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert r.events == [] and r.tls_failures >= 1 and r.requests == 0


@pytest.mark.parametrize("kind", list(PAIRS))
def test_https_without_ca_uses_the_system_store_and_refuses_the_test_ca(pki, kind, pairs):
    r, s = pairs(kind, pki, "https", ca=None)
    err = _raises(s, make_events(1))
    assert err.retryable and "TLS" in str(err)
    assert r.events == []


@pytest.mark.parametrize("kind", list(PAIRS))
def test_receiver_down_is_retryable_and_recovers(pki, scheme, kind, pairs):
    r, s = pairs(kind, pki, scheme)
    batch = make_events(3)
    s.send(batch[:1])  # a pooled keep-alive connection exists now
    port = r.port
    r.down()
    err = _raises(s, batch[1:])
    assert err.retryable and "connect" in str(err) and err.retry_after is None and not err.split
    r.up()
    assert r.port == port
    s.send(batch[1:])
    assert r.unique_ids() == [e.id for e in batch]


@pytest.mark.parametrize("kind", list(PAIRS))
@pytest.mark.parametrize("retry_after", ["7", None])
def test_429_is_retryable_with_retry_after(pki, kind, retry_after, pairs):
    r, s = pairs(kind, pki)
    r.fail_next(1, 429, headers={"Retry-After": retry_after} if retry_after else None)
    err = _raises(s, make_events(2))
    assert err.retryable and "HTTP 429" in str(err)
    assert err.retry_after == (7.0 if retry_after else None)
    s.send(make_events(2))
    assert len(r.unique_ids()) == 2


@pytest.mark.parametrize("kind", list(PAIRS))
@pytest.mark.parametrize("status", [408, 500, 502, 503, 504])
def test_server_errors_are_retryable(pki, kind, status, pairs):
    r, s = pairs(kind, pki)
    r.fail_next(1, status)
    err = _raises(s, make_events(1))
    assert err.retryable and f"HTTP {status}" in str(err)


def test_hec_server_busy_code_9_is_retryable(pki, pairs):
    r, s = pairs("hec", pki)
    r.fail_next(1, 503, headers={"Retry-After": "3"})
    err = _raises(s, make_events(2))
    assert err.retryable and "HEC code 9" in str(err) and "Server is busy" in str(err) and err.retry_after == 3.0


@pytest.mark.parametrize("kind", list(PAIRS))
def test_refused_credentials_are_retryable(pki, kind, pairs):
    r, s = pairs(kind, pki, "https")
    # the receiver now expects other credentials
    if kind == "hec":
        r.token = "another-token"
    elif kind == "bulk":
        r.password = "another-password"
    else:
        r.token = "another-token"
    err = _raises(s, make_events(2))
    assert err.retryable and "credentials refused" in str(err) and not err.split
    assert r.events == []


def test_hec_token_codes_follow_the_documentation(pki, pairs):
    r, s = pairs("hec", pki)
    r.token = "other"
    err = _raises(s, make_events(1))
    assert "HTTP 403" in str(err) and "HEC code 4" in str(err) and "Invalid token" in str(err)
    r.token, r.disabled = HEC_TOKEN, True
    err = _raises(s, make_events(1))
    assert err.retryable and "HEC code 1" in str(err)


def test_secrets_echoed_by_a_receiver_are_scrubbed(pki, pairs):
    for kind, secret in (("hec", HEC_TOKEN), ("bulk", ES_PASSWORD), ("webhook", WEBHOOK_TOKEN)):
        r, s = pairs(kind, pki)
        r.fail_next(1, 401, body={"text": f"token {secret} refused", "code": 4})
        err = _raises(s, make_events(1))  # _raises asserts no secret is in the message
        assert "***" in str(err)
        r.fail_next(1, 400, body=f"bad request for {secret}".encode())
        err = _raises(s, make_events(1))
        assert not err.retryable and "***" in str(err)


@pytest.mark.parametrize("kind", list(PAIRS))
def test_400_is_not_retryable(pki, kind, pairs):
    r, s = pairs(kind, pki)
    r.fail_next(1, 400, body={"text": "Invalid data format", "code": 6, "invalid-event-number": 0}
                if kind == "hec" else None)
    err = _raises(s, make_events(1))
    assert not err.retryable and err.rejected == () and "400" in str(err)


@pytest.mark.parametrize("kind", list(PAIRS))
@pytest.mark.parametrize("status", [404, 307])
def test_wrong_url_is_retryable(pki, kind, status, pairs):
    r, s = pairs(kind, pki)
    r.fail_next(1, status, body={"error": "moved"}, headers={"Location": "http://127.0.0.1:1/elsewhere"})
    err = _raises(s, make_events(1))
    assert err.retryable and "fix the url" in str(err)
    assert r.requests == 1  # the redirect was not followed


def test_unknown_path_on_the_real_endpoint_is_classified(pki, pairs):
    # the webhook receiver answers 404 for a path it does not serve
    r, _ = pairs("webhook", pki)
    s = WebhookSink.from_config("hook", "json", {"url": r.url + "/wrong", "token": "vault:secret/siem#webhook",
                                                 "headers": {"X-Tenant-Key": "env:WEBHOOK_HEADER"}}, Resolver())
    try:
        err = _raises(s, make_events(1))
        assert err.retryable and "HTTP 404" in str(err)
    finally:
        s.close()


@pytest.mark.parametrize("kind", list(PAIRS))
def test_413_asks_for_a_split_and_refuses_a_single_event(pki, kind, pairs):
    one = len(make_events(1)[0].raw)
    r, s = pairs(kind, pki, receiver_kw={"max_body": one * 3})
    err = _raises(s, make_events(8))
    assert err.retryable and err.split and "413" in str(err)
    big = make_events(1, reason="x" * (one * 4))
    err = _raises(s, big)
    assert not err.retryable and not err.split and err.rejected == ()
    s.send(make_events(1, start=50))  # the connection was closed by the 413 and is replaced
    assert len(r.unique_ids()) == 1


def test_hec_unexpected_200_reply_is_retryable(pki, pairs):
    r, s = pairs("hec", pki)
    r.fail_next(1, 200, body=b"<html>proxy login</html>")
    err = _raises(s, make_events(1))
    assert err.retryable and "unexpected reply" in str(err)


def test_hec_invalid_events_are_isolated_and_rejected(pki, pairs):
    r, s = pairs("hec", pki)
    batch = make_events(7)
    bad = {batch[2].id, batch[5].id}
    r.reject_events(lambda env: env["event"]["id"] in bad)
    err = _raises(s, batch)
    assert not err.retryable and err.rejected == (2, 5)
    assert "Invalid data format" in str(err)
    assert set(r.unique_ids()) == {e.id for e in batch} - bad  # every other event arrived (at least once)
    r.reject_events(lambda env: True)
    err = _raises(s, make_events(3, start=10))
    assert not err.retryable and err.rejected == ()  # all refused: the whole batch


def test_hec_configuration_codes_are_retryable(pki, pairs):
    r, s = pairs("hec", pki, index="forbidden", receiver_kw={"indexes": ["main"]})
    err = _raises(s, make_events(2))
    assert err.retryable and "HEC code 7" in str(err) and "Incorrect index" in str(err)
    r2, s2 = pairs("hec", pki, receiver_kw={"require_channel": True})
    err = _raises(s2, make_events(1))
    assert err.retryable and "HEC code 10" in str(err)
    r3, s3 = pairs("hec", pki, channel=True, receiver_kw={"require_channel": True})
    s3.send(make_events(1))
    assert uuid.UUID(r3.channels[0])


# --------------------------------------------------------------------------- bulk specifics


def test_bulk_redelivery_is_idempotent(pki, pairs):
    r, s = pairs("bulk", pki, "https")
    batch = make_events(6)
    s.send(batch)
    s.send(batch)  # every item is a 409 now: delivered
    assert r.requests == 2
    assert r.unique_ids() == [e.id for e in batch] and r.duplicates() == 0
    assert len(r.indices["egress-audit"]) == 6
    # a partly delivered batch (the shipper resends after a lost reply) completes
    more = make_events(3, start=100)
    s.send(batch[3:] + more)
    assert r.unique_ids() == [e.id for e in batch + more] and r.duplicates() == 0


def test_bulk_per_item_rejection(pki, pairs):
    r, s = pairs("bulk", pki)
    good = make_events(2)
    bad = make_events(1, start=3, request={"port": "not-a-port"})
    s.send(good)  # maps request.port as long
    err = _raises(s, [*make_events(1, start=10), bad[0], *make_events(1, start=11)])
    assert not err.retryable and err.rejected == (1,)
    assert "document_parsing_exception" in str(err) and "request.port" in str(err)
    assert len(r.unique_ids()) == 4 and bad[0].id not in r.unique_ids()


def test_bulk_transient_items_make_the_batch_retryable(pki, pairs):
    r, s = pairs("bulk", pki, flavor="opensearch")
    s.send(make_events(1))
    batch = [*make_events(2, start=10), *make_events(1, start=12, request={"port": "x"})]
    r.fail_ids([batch[0].id], status=429)
    err = _raises(s, batch)
    assert err.retryable and err.rejected == () and "es_rejected_execution_exception" in str(err)
    assert batch[0].id not in r.unique_ids() and batch[1].id in r.unique_ids()
    err = _raises(s, batch)  # now only the refused document is left
    assert not err.retryable and err.rejected == (2,) and "mapper_parsing_exception" in str(err)
    assert r.duplicates() == 0 and batch[0].id in r.unique_ids()


@pytest.mark.parametrize("status", [503, 403, 404])
def test_bulk_other_transient_item_statuses(pki, status, pairs):
    r, s = pairs("bulk", pki)
    batch = make_events(2)
    r.fail_ids([batch[1].id], status=status)
    err = _raises(s, batch)
    assert err.retryable
    s.send(batch)
    assert r.unique_ids() == [e.id for e in batch]


def test_bulk_wrong_api_key_is_retryable(pki, pairs):
    r, s = pairs("bulk", pki, auth="api_key")
    r.api_key = "d3Jvbmc="
    err = _raises(s, make_events(1))
    assert err.retryable and "credentials refused" in str(err) and "security_exception" in str(err)


# --------------------------------------------------------------------------- secrets and config


def test_describe_and_errors_hold_no_secrets(pki, pairs):
    sinks = []
    for kind in PAIRS:
        r, s = pairs(kind, pki, "https")
        sinks.append(s)
        r.down()
        _raises(s, make_events(1))
    for s in sinks:
        text = s.describe() + repr(s) + str(vars(s).get("origin"))
        for secret in ALL_SECRETS:
            assert secret not in text
    assert [s.describe().split()[0] for s in sinks] == ["splunk_hec", "elasticsearch", "webhook"]


def test_secrets_are_resolved_once_at_construction(pki):
    res = Resolver()
    s = WebhookSink.from_config("hook", "json", {"url": "https://127.0.0.1:9/x", "token": "vault:secret/siem#webhook",
                                                 "headers": {"X-A": "env:WEBHOOK_HEADER"}}, res)
    assert sorted(res.calls) == ["env:WEBHOOK_HEADER", "vault:secret/siem#webhook"]
    s.close()


BASE = {"splunk_hec": {"url": "https://127.0.0.1:8088", "token": "env:HEC_TOKEN"},
        "elasticsearch": {"url": "https://127.0.0.1:9200"},
        "opensearch": {"url": "https://127.0.0.1:9200"},
        "webhook": {"url": "https://127.0.0.1:8443/hook"}}


@pytest.mark.parametrize("kind", list(BASE))
def test_unknown_options_list_the_known_ones(kind):
    with pytest.raises(ValueError) as ei:
        SINK_CLASSES[kind].from_config("s1", "json", {**BASE[kind], "tokn": "x", "verify": False}, Resolver())
    msg = str(ei.value)
    assert msg.startswith("audit.sinks.s1: unknown options tokn, verify")
    for known in SINK_CLASSES[kind].OPTIONS:
        assert known in msg


@pytest.mark.parametrize("kind,key", [("splunk_hec", "token"), ("elasticsearch", "api_key"),
                                      ("elasticsearch", "password"), ("webhook", "token")])
@pytest.mark.parametrize("literal", ["s3cr3t-literal-value", "Bearer:abc123", "unknown:scheme"])
def test_secret_options_require_references(kind, key, literal):
    opts = {**BASE[kind], key: literal}
    if key == "password":
        opts["username"] = "egress"
    with pytest.raises(ValueError) as ei:
        SINK_CLASSES[kind].from_config("s1", "json", opts, Resolver())
    msg = str(ei.value)
    assert msg.startswith(f"audit.sinks.s1: {key}: must be a secret reference")
    assert "use env:NAME, file:PATH, local:PATH or vault:PATH#field" in msg
    assert literal not in msg and literal.partition(":")[0] not in msg.split("reference", 1)[1]


@pytest.mark.parametrize("options,fragment", [
    ({"url": "ftp://x"}, "url: must be an http:// or https:// URL"),
    ({"url": "https://user:pw@127.0.0.1"}, "url: cannot hold credentials"),
    ({"url": "https://127.0.0.1/x?key=abc"}, "url: cannot have a query string"),
    ({"url": "https://127.0.0.1:99999"}, "url: not a valid URL"),
    ({"url": 5}, "url: must be a non-empty string"),
    ({}, "url: required"),
    ({"connect_timeout": 0}, "connect_timeout: must be a number of seconds"),
    ({"read_timeout": "30"}, "read_timeout: must be a number of seconds"),
    ({"read_timeout": True}, "read_timeout: must be a number of seconds"),
    ({"compress": "yes"}, "compress: must be true or false"),
    ({"ca": "relative.pem"}, "ca: must be an absolute path"),
    ({"ca": "/nonexistent/ca.pem"}, "ca: /nonexistent/ca.pem is not a readable file"),
    ({"token": "vault-dynamic:db/creds/x#password"}, "token: vault-dynamic: references are not supported"),
    ({"token": "env:NOT_THERE"}, "token: cannot resolve env:NOT_THERE: KeyError"),
    ({"token": "vault:secret"}, "token: malformed secret reference"),
    ({"headers": {"X-A": "plain value"}}, "headers.X-A: must be a secret reference"),
    ({"headers": {"X-A": "v ${env:WEBHOOK_HEADER"}}, "headers.X-A: malformed value template"),
    ({"headers": {"X-A": "literal $${only}"}}, "headers.X-A: header values may hold secrets"),
    ({"headers": {"Content-Type": "env:WEBHOOK_HEADER"}}, "headers.Content-Type: this header is set by the sink"),
    ({"headers": {"bad name": "env:WEBHOOK_HEADER"}}, "headers: invalid header name"),
    ({"headers": ["X-A"]}, "headers: must be a mapping"),
    ({"token": "vault:secret/siem#webhook", "headers": {"Authorization": "env:WEBHOOK_HEADER"}},
     "token: token sets the Authorization header"),
])
def test_webhook_option_errors(options, fragment):
    opts = {"url": "https://127.0.0.1:8443/hook", **options}
    if "url" in options or options == {}:
        opts = dict(options)
    with pytest.raises(ValueError) as ei:
        WebhookSink.from_config("w", "json", opts, Resolver())
    assert str(ei.value).startswith("audit.sinks.w: ") and fragment in str(ei.value)


def test_ca_with_http_url_is_an_error(pki):
    with pytest.raises(ValueError, match="ca: only used with an https:// url"):
        WebhookSink.from_config("w", "json", {"url": "http://127.0.0.1:1/", "ca": pki["ca"]}, Resolver())


@pytest.mark.parametrize("options,fragment", [
    ({"url": "https://127.0.0.1:8088/services/collector/event"}, "url: give the base URL"),
    ({"token": None}, "token: required for a splunk_hec sink"),
    ({"channel": "not-a-guid"}, "channel: must be a GUID"),
    ({"channel": 5}, "channel: must be a GUID or true"),
    ({"index": ""}, "index: must be a non-empty string"),
    ({"sourcetype": "a\nb"}, "sourcetype: cannot contain CR, LF or NUL"),
])
def test_hec_option_errors(options, fragment):
    opts = {**BASE["splunk_hec"], **options}
    opts = {k: v for k, v in opts.items() if v is not None}
    with pytest.raises(ValueError) as ei:
        HecSink.from_config("h", "json", opts, Resolver())
    assert fragment in str(ei.value)


@pytest.mark.parametrize("options,fragment", [
    ({"url": "https://127.0.0.1:9200/_bulk"}, "url: give the base URL"),
    ({"index": "Egress-Audit"}, "must be lowercase"),
    ({"index": "audit-%B"}, "must be lowercase"),
    ({"index": "_audit"}, "cannot start with"),
    ({"index": "a b"}, "cannot contain"),
    ({"username": "egress"}, "password: username and password go together"),
    ({"password": "local:siem/es-password"}, "username: username and password go together"),
    ({"username": "e:x", "password": "local:siem/es-password"}, "username: cannot contain ':'"),
    ({"api_key": "file:/run/secrets/es-api-key", "username": "egress", "password": "local:siem/es-password"},
     "api_key: use either username + password or api_key"),
])
def test_bulk_option_errors(options, fragment):
    with pytest.raises(ValueError) as ei:
        BulkSink.from_config("e", "json", {**BASE["elasticsearch"], **options}, Resolver())
    assert fragment in str(ei.value)


def test_from_config_ignores_kind_and_format_keys_and_builds_every_kind():
    for kind, opts in BASE.items():
        s = SINK_CLASSES[kind].from_config("x", "ocsf", {**opts, "kind": kind, "format": "ocsf"}, Resolver())
        assert s.kind == kind and s.fmt == "ocsf" and s.describe().startswith(kind + " https://127.0.0.1:")
        s.close()
    assert SINK_CLASSES["opensearch"] is OpenSearchSink and issubclass(OpenSearchSink, BulkSink)


def test_bad_format_is_refused():
    with pytest.raises(ValueError, match="unknown format"):
        HecSink.from_config("h", "cef", BASE["splunk_hec"], Resolver())


def test_retry_after_parsing():
    now = time.time()
    assert retry_after_seconds("120") == 120.0
    assert retry_after_seconds(" 0 ") == 0.0
    assert retry_after_seconds(email.utils.formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert retry_after_seconds(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None
    assert retry_after_seconds("99999999") == 86400.0


def test_index_name_rules():
    assert index_name_problem("egress-audit-2026.11.24") is None
    assert index_name_problem("Egress") == "must be lowercase"
    assert index_name_problem("-x") and index_name_problem("a*b") and index_name_problem("..")
    assert index_name_problem("x" * 256)


# --------------------------------------------------------------------------- the receivers themselves


def _raw(r, method, path, body=b"", headers=None, ca=None):
    pool = urllib3.PoolManager(cert_reqs="CERT_REQUIRED" if ca else "CERT_NONE", ca_certs=ca, retries=False)
    try:
        resp = pool.request(method, r.url + path, body=body, headers=headers or {})
        return resp.status, (json.loads(resp.data) if resp.data else None)
    finally:
        pool.clear()


def test_hec_receiver_follows_the_documented_replies(pki):
    with HecReceiver("t0k3n-value") as r:
        ok = {"Authorization": "Splunk t0k3n-value"}
        assert _raw(r, "POST", "/services/collector/event", b'{"event":"x"}') == (401, {"text": "Token is required",
                                                                                      "code": 2})
        assert _raw(r, "POST", "/services/collector", b'{"event":"x"}',
                    {"Authorization": "Bearer t0k3n-value"})[1]["code"] == 3
        assert _raw(r, "POST", "/services/collector", b'{"event":"x"}',
                    {"Authorization": "Splunk nope"}) == (403, {"text": "Invalid token", "code": 4})
        basic = base64.b64encode(b"x:t0k3n-value").decode()
        assert _raw(r, "POST", "/services/collector", b'{"event":"b"}', {"Authorization": f"Basic {basic}"})[0] == 200
        assert _raw(r, "POST", "/services/collector", b"  ", ok) == (400, {"text": "No data", "code": 5})
        st, body = _raw(r, "POST", "/services/collector/event", b'{"event":1}{"time":"x","event":2}', ok)
        assert (st, body) == (400, {"text": "Invalid data format", "code": 6, "invalid-event-number": 1})
        st, body = _raw(r, "POST", "/services/collector/event", b'{"event":3} {"host":"h"}', ok)
        assert body == {"text": "Event field is required", "code": 12, "invalid-event-number": 1}
        assert _raw(r, "POST", "/services/collector/event", b'{"event":""}', ok)[1]["code"] == 13
        assert _raw(r, "POST", "/services/collector/event", b'{"event":4,"fields":{"a":{"b":1}}}', ok)[1]["code"] == 15
        assert _raw(r, "POST", "/services/collector/event", b'{"event":5}',
                    {**ok, "X-Splunk-Request-Channel": "nope"})[1]["code"] == 11
        assert _raw(r, "POST", "/services/collector/raw", b"x", ok)[0] == 404
        assert _raw(r, "GET", "/services/collector/health")[1]["code"] == 17
        gz = gzip.compress(b'{"event":{"z":1},"time":"1700000000.5"}')
        assert _raw(r, "POST", "/services/collector/event", gz, {**ok, "Content-Encoding": "gzip"}) == (
            200, {"text": "Success", "code": 0})
        # events before an invalid one are indexed, as Splunk does
        assert r.events == ["b", 1, 3, {"z": 1}]


def test_bulk_receiver_follows_the_documented_replies(pki):
    with BulkReceiver(tls=pki["leaf"]) as r:
        nd = {"Content-Type": "application/x-ndjson"}
        body = b'{"create":{"_index":"i","_id":"1"}}\n{"a":1}\n'
        assert _raw(r, "POST", "/_bulk", body, {"Content-Type": "text/plain"}, pki["ca"])[0] == 406
        assert _raw(r, "POST", "/_bulk", body, {}, pki["ca"])[0] == 406
        st, resp = _raw(r, "POST", "/_bulk", body[:-1], nd, pki["ca"])
        assert st == 400 and resp["error"]["type"] == "illegal_argument_exception"
        assert "terminated by a newline" in resp["error"]["reason"]
        st, resp = _raw(r, "POST", "/_bulk", b'{"explode":{}}\n{}\n', nd, pki["ca"])
        assert st == 400 and "expected one of [create, delete, index, update]" in resp["error"]["reason"]
        st, resp = _raw(r, "POST", "/_bulk", b'{"create":{"_index":"i","_type":"t"}}\n{}\n', nd, pki["ca"])
        assert st == 400 and "unknown parameter [_type]" in resp["error"]["reason"]
        st, resp = _raw(r, "POST", "/_bulk", b'{"index":{"_id":"1"}}\n{}\n', nd, pki["ca"])
        assert st == 400 and "index is missing" in resp["error"]["reason"]
        st, resp = _raw(r, "POST", "/_bulk", body + b'{"create":{"_index":"i","_id":"1"}}\n{"a":2}\n'
                        + b'{"index":{"_index":"Bad"}}\n{}\n' + b'{"index":{"_index":"i","_id":"2"}}\n{"a":"x"}\n',
                        nd, pki["ca"])
        assert st == 200 and resp["errors"] is True
        statuses = [next(iter(i.values()))["status"] for i in resp["items"]]
        assert statuses == [201, 409, 400, 400]
        assert resp["items"][1]["create"]["error"]["type"] == "version_conflict_engine_exception"
        assert resp["items"][2]["index"]["error"]["type"] == "invalid_index_name_exception"
        assert resp["items"][3]["index"]["error"]["type"] == "document_parsing_exception"
        st, resp = _raw(r, "POST", "/i/_bulk", b'{"index":{"_id":"1"}}\n{"a":3}\n{"delete":{"_id":"9"}}\n', nd,
                        pki["ca"])
        assert resp["errors"] is False and [next(iter(i.values()))["status"] for i in resp["items"]] == [200, 404]
        assert r.indices == {"i": {"1": {"a": 3}}} and r.events == [{"a": 1}, {"a": 3}]


def test_bulk_receiver_security(pki):
    with BulkReceiver(username="u", password="p4ss") as r:
        nd = {"Content-Type": "application/x-ndjson"}
        body = b'{"create":{"_index":"i"}}\n{"a":1}\n'
        st, resp = _raw(r, "POST", "/_bulk", body, nd)
        assert st == 401 and resp["error"]["type"] == "security_exception"
        bad = base64.b64encode(b"u:wrong").decode()
        assert "unable to authenticate user [u]" in _raw(r, "POST", "/_bulk", body,
                                                         {**nd, "Authorization": f"Basic {bad}"})[1]["error"]["reason"]
        good = base64.b64encode(b"u:p4ss").decode()
        assert _raw(r, "POST", "/_bulk", body, {**nd, "Authorization": f"Basic {good}"})[0] == 200


def test_webhook_receiver_validates_ndjson():
    with WebhookReceiver() as r:
        nd = {"Content-Type": "application/x-ndjson"}
        assert _raw(r, "POST", "/", b'{"a":1}', nd)[0] == 400  # no final newline
        assert _raw(r, "POST", "/", b'{"a":1}\n', {"Content-Type": "application/json"})[0] == 415
        assert _raw(r, "POST", "/", b'{"a":1}\n[1]\n', nd)[0] == 400
        assert _raw(r, "POST", "/", b'{"a":1}\n{"b":2}\n', nd) == (200, {"accepted": 2})
        assert r.events == [{"a": 1}, {"b": 2}] and r.requests == 4


def test_receiver_down_refuses_connections_and_up_reuses_the_port():
    with WebhookReceiver() as r:
        port = r.port
        r.down()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        r.up()
        assert r.port == port
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_receiver_on_ipv6_loopback(pki):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        r = HecReceiver(HEC_TOKEN, host="::1", tls=pki["leaf"])
    except OSError:
        pytest.skip("::1 not available")
    with r:
        s = HecSink.from_config("h6", "json", {"url": r.url, "token": "env:HEC_TOKEN", "ca": pki["ca"]}, Resolver())
        s.send(make_events(2))
        assert len(r.events) == 2 and s.describe() == f"splunk_hec https://[::1]:{r.port}"
        s.close()


# --------------------------------------------------------------------------- property tests

_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**53, 2**53),
                          st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
_json = st.recursive(_json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                     max_leaves=12)
_event_values = _json.filter(lambda v: v is not None and v != "")
_envelope = st.fixed_dictionaries(
    {"event": _event_values},
    optional={"time": st.one_of(st.integers(0, 2**33), st.floats(0, 2e9),
                                st.from_regex(r"\A[0-9]{1,10}(\.[0-9]{1,6})?\Z")),
              "host": st.text(max_size=10), "source": st.text(max_size=10), "sourcetype": st.text(max_size=10),
              "index": st.text(max_size=10),
              "fields": st.dictionaries(st.text(max_size=5), st.one_of(st.text(max_size=5),
                                                                       st.lists(st.text(max_size=5), max_size=3)),
                                        max_size=3)})
_ws = st.text(alphabet=" \t\r\n", max_size=4)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(_envelope, _ws, st.sampled_from([None, 2]), st.booleans()), min_size=1, max_size=6),
       _ws)
def test_hec_parser_reads_concatenated_objects_with_any_whitespace(items, lead):
    body = lead + "".join(ws + json.dumps(env, indent=indent, ensure_ascii=ascii_)
                          for env, ws, indent, ascii_ in items)
    assert parse_hec_body(body.encode()) == [env for env, *_ in items]


@settings(max_examples=100, deadline=None)
@given(st.lists(_envelope, min_size=1, max_size=5), st.data())
def test_hec_parser_points_at_the_first_invalid_object(envs, data):
    bad_at = data.draw(st.integers(0, len(envs) - 1))
    bad = data.draw(st.sampled_from(['[1]', '"x"', '{"host":"h"}', '{"event":1,"time":true}', '{"event":1',
                                     '{"event":null}']))
    body = "".join(json.dumps(e) for e in envs[:bad_at]) + bad + "".join(json.dumps(e) for e in envs[bad_at:])
    with pytest.raises(HecFormatError) as ei:
        parse_hec_body(body.encode())
    assert ei.value.index == bad_at and ei.value.code in (6, 12, 13)


_ids = st.text(alphabet="abcdef0123456789-", min_size=1, max_size=12)
_docs = st.dictionaries(st.text(min_size=1, max_size=8), _json, max_size=5)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_ids, _docs, st.sampled_from(["", "2026-11-24T01:02:03Z", "2027-02-28T23:00:00+01:00"])),
                min_size=1, max_size=6),
       st.sampled_from(["json", "ocsf", "ecs"]))
def test_sink_bodies_parse_back_into_the_batch(rows, fmt):
    batch = [Event(json.dumps({"id": i, "ts": ts, "event": "note", "payload": d} if ts
                              else {"id": i, "event": "note", "payload": d}).encode()) for i, d, ts in rows]
    hec = HecSink("h", fmt, url="http://127.0.0.1:9", token="tok-prop")
    bulk = BulkSink("b", fmt, url="http://127.0.0.1:9", index="a-%Y.%m")
    hook = WebhookSink("w", fmt, url="http://127.0.0.1:9/x")
    try:
        envs = parse_hec_body(hec.build_body(batch))
        assert [e["event"] for e in envs] == [json.loads(render(ev, fmt)) for ev in batch]
        assert [("time" in e) for e in envs] == [bool(ts) for _, _, ts in rows]
        ops = parse_bulk_body(bulk.build_body(batch))
        assert [(o.action, o.meta["_id"], json.loads(o.source)) for o in ops] == [
            ("create", ev.id, json.loads(render(ev, fmt))) for ev in batch]
        assert all(index_name_problem(o.meta["_index"]) is None for o in ops)
        lines = hook.build_body(batch).split(b"\n")
        assert lines[-1] == b"" and [json.loads(x) for x in lines[:-1]] == [json.loads(render(ev, fmt)) for ev in batch]
    finally:
        for s in (hec, bulk, hook):
            s.close()
