"""Configuration: defaults, file, flags, and clear errors naming the setting."""

from __future__ import annotations

import pytest

from gateway.config import ConfigError, GatewayConfig, load_config, parse_host_overrides, parse_hostport


def test_defaults_are_runnable():
    cfg = load_config(None)
    assert cfg.listen == "127.0.0.1:8080" and cfg.admin == "127.0.0.1:8081"
    assert [s.mitmproxy_mode() for s in cfg.mode_specs()] == ["regular@127.0.0.1:8080"]
    assert cfg.audit_dir.name == "audit" and cfg.audit.sinks == () and cfg.audit.on_full == "deny"


def test_file_then_flags(tmp_path):
    (tmp_path / "pol").mkdir()
    f = tmp_path / "g.yaml"
    f.write_text("listen: 127.0.0.1:3128\nmodes: [explicit, transparent]\npolicies: pol\n"
                 "hosts: {Billing.Internal: 10.0.0.5, dual.test: [10.0.0.6, 'fd00::6']}\nreload_interval: 0\n")
    cfg = load_config(f, listen="127.0.0.1:9000", extra_hosts={"x.test": ("127.0.0.1",)})
    assert cfg.listen == "127.0.0.1:9000"
    assert cfg.policies == str(tmp_path / "pol")  # relative to the file
    assert cfg.hosts == {"billing.internal": ("10.0.0.5",), "dual.test": ("10.0.0.6", "fd00::6"),
                         "x.test": ("127.0.0.1",)}
    assert [s.mitmproxy_mode() for s in cfg.mode_specs()] == ["regular@127.0.0.1:9000",
                                                              "transparent@127.0.0.1:9001"]
    assert cfg.reload_interval == 0


@pytest.mark.parametrize("text,needle", [
    ("listn: x\n", "unknown setting(s) listn"),
    ("hosts: {a.test: not-an-ip}\n", "hosts: a.test"),
    ("modes: [sideways]\n", "unknown mode 'sideways'"),
    ("admin: nope\n", "admin: expected HOST:PORT"),
    ("engine: java\n", "engine: must be rust or python"),
    ("policies: /nonexistent/dir\n", "is not a directory"),
    ("reload_interval: soon\n", "reload_interval"),
    ("- a\n- b\n", "must hold a mapping"),
    ("listen: [unclosed\n", "not valid YAML"),
])
def test_file_errors_name_the_setting(tmp_path, text, needle):
    f = tmp_path / "g.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert needle in str(e.value)


def test_hostport_and_overrides():
    assert parse_hostport("[::1]:8080", "x") == ("::1", 8080)
    assert parse_hostport("0.0.0.0:0", "x") == ("0.0.0.0", 0)
    for bad in ("8080", "host:", "host:99999", ":80"):
        with pytest.raises(ConfigError):
            parse_hostport(bad, "listen")
    assert parse_host_overrides(["A.test=1.2.3.4", "a.test=::1"]) == {"a.test": ("1.2.3.4", "::1")}
    with pytest.raises(ConfigError):
        parse_host_overrides(["nope"])


def test_transparent_mode_with_explicit_address():
    cfg = GatewayConfig(modes=("transparent@[::1]:7000",)).validate()
    assert cfg.mode_specs()[0].mitmproxy_mode() == "transparent@[::1]:7000"
