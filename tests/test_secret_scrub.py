"""Reflection scrubbing (Hypothesis: any chunking finds every occurrence)."""

from __future__ import annotations

from hypothesis import given, strategies as st

from gateway.secrets.scrub import StreamScrubber, scrub_bytes, variants

SECRET = "sk-live/abc+def=="


def test_variants_include_json_and_percent_encoded():
    v = variants([SECRET])
    assert SECRET.encode() in v and b"sk-live\\/abc+def==" not in v  # json.dumps does not escape /
    assert b"sk-live%2Fabc%2Bdef%3D%3D" in v


def test_scrub_keeps_length():
    data = f'{{"echo": "{SECRET}", "again": "{SECRET}"}}'.encode()
    out, hits = scrub_bytes(data, variants([SECRET]))
    assert hits == 2 and len(out) == len(data) and SECRET.encode() not in out


@given(st.binary(max_size=200), st.binary(max_size=200), st.lists(st.integers(1, 50), max_size=20),
       st.integers(0, 3))
def test_stream_scrubber_finds_occurrences_across_any_chunking(prefix, suffix, cuts, copies):
    secret = SECRET.encode()
    body = prefix + b"".join(secret + b"|" for _ in range(copies)) + suffix
    s = StreamScrubber(variants([SECRET]))
    out, pos = [], 0
    for c in cuts:
        if pos >= len(body):
            break
        out.extend(s(body[pos:pos + c]))
        pos += c
    if pos < len(body):
        out.extend(s(body[pos:]))
    out.extend(s(b""))
    assert all(out), "an empty chunk would end a chunked body"
    result = b"".join(out)
    assert len(result) == len(body)
    assert secret not in result
    expected, _ = scrub_bytes(body, variants([SECRET]))
    assert result == expected
