"""The local encrypted store: round trip, sealing, permissions, clear errors without values."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings, strategies as st

from gateway.secrets.local import KEY_ENV, LocalStore, StoreError


def test_put_get_delete_names(tmp_path):
    s = LocalStore(tmp_path)
    s.put("github/token", "ghp_example_value")
    s.put("llm.key", "sk-test-123")
    assert s.get("github/token") == "ghp_example_value"
    assert s.names() == ["github/token", "llm.key"]
    assert s.delete("llm.key") and not s.delete("llm.key")
    assert s.get("llm.key") is None
    assert LocalStore(tmp_path).get("github/token") == "ghp_example_value"  # survives a restart
    raw = (tmp_path / "secrets" / "store.json").read_text()
    assert "ghp_example_value" not in raw
    for f in ("store.json", "store.key"):
        assert os.stat(tmp_path / "secrets" / f).st_mode & 0o777 == 0o600


def test_value_cannot_be_moved_to_another_name(tmp_path):
    s = LocalStore(tmp_path)
    s.put("a", "value-a")
    s.put("b", "value-b")
    p = tmp_path / "secrets" / "store.json"
    doc = json.loads(p.read_text())
    doc["secrets"]["b"] = doc["secrets"]["a"]
    p.write_text(json.dumps(doc))
    with pytest.raises(StoreError) as e:
        s.get("b")
    assert "value-a" not in str(e.value)


def test_wrong_key_and_corrupt_store(tmp_path, monkeypatch):
    LocalStore(tmp_path).put("x", "secret-x")
    monkeypatch.setenv(KEY_ENV, "A" * 43)
    with pytest.raises(StoreError, match="cannot be decrypted"):
        LocalStore(tmp_path).get("x")
    monkeypatch.setenv(KEY_ENV, "short")
    with pytest.raises(StoreError, match=KEY_ENV):
        LocalStore(tmp_path)
    monkeypatch.delenv(KEY_ENV)
    (tmp_path / "secrets" / "store.json").write_text("{not json")
    with pytest.raises(StoreError, match="not a valid secret store"):
        LocalStore(tmp_path).names()


@pytest.mark.parametrize("name", ["", "UPPER", "a b", "../x", "x/", "-x"])
def test_bad_names(tmp_path, name):
    with pytest.raises(ValueError):
        LocalStore(tmp_path).put(name, "v")


@settings(max_examples=30, deadline=None)
@given(st.text(min_size=1, max_size=200))
def test_any_value_round_trips(tmp_path_factory, value):
    s = LocalStore(tmp_path_factory.mktemp("s"))
    s.put("k", value)
    assert s.get("k") == value
