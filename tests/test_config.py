"""Config errors name the file and the key; values are checked by the Structs themselves."""

from __future__ import annotations

import pytest

from mailerd.config import ConfigError, apply_setting, load_config
from mailerd.schema.config import MAX_DURATION, ServerConfig, parse_duration
from mailerd.testing.daemon import write_config

NINES = "9" * 400


@pytest.mark.parametrize("sections, message", [
    ({"servers.isp": {"port": 0}}, "key servers.isp.port: Expected `int` >= 1"),
    ({"servers.isp": {"port": 70000}}, "key servers.isp.port: Expected `int` <= 65535"),
    ({"servers.isp": {"connections": 257}}, "key servers.isp.connections: Expected `int` <= 256"),
    ({"servers.isp": {"daily_quota": -1}}, "key servers.isp.daily_quota: Expected `int` >= 0"),
    ({"servers.isp": {"rate": "fast"}}, "key servers.isp.rate: invalid rate 'fast'"),
    ({"servers.isp": {"group_size": 5}}, "key servers.isp.group_size: needs group_interval"),
    ({"servers.isp": {"password_file": "/x"}}, "key servers.isp.password_file: needs username"),
    ({"servers.isp": {"timeout": 0}}, "key servers.isp.timeout: must be positive"),
    ({"servers.isp": {"group_interval": f"{NINES}s"}},
     "key servers.isp.group_interval: invalid duration '99999999999999999...': must be between"),
    ({"servers.isp": {"idle_timeout": "31d"}}, "key servers.isp.idle_timeout: invalid duration '31d'"),
    ({"patterns": {"quota": ["ok", "("]}},
     "key patterns.quota[1]: '(' is not a valid regular expression"),
    ({"suppression": {"bounce_patterns": ["[a"]}},
     "key suppression.bounce_patterns[0]: '[a' is not a valid regular expression"),
    ({"delivery": {"retry_initial": "2h", "retry_max": "1h"}},
     "key delivery.retry_max: must not be less than retry_initial"),
    ({"delivery": {"max_attempts": 0}}, "key delivery.max_attempts: Expected `int` >= 1"),
    ({"daemon": {"socket_mode": 0o1777}}, "key daemon.socket_mode: must be a file mode"),
    ({"daemon": {"socket_group": "no-such-group-here"}},
     "key daemon.socket_group: no group named 'no-such-group-here'"),
    ({"servers.isp": {"prot": 25}}, "unknown key servers.isp.prot"),
])
def test_a_bad_value_names_the_file_and_the_key(tmp_path, sections, message):
    path = write_config(tmp_path / "bad.toml", sections)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert str(raised.value).startswith(f"{path}: {message}")
    assert NINES not in str(raised.value)


def test_durations_are_bounded_and_finite():
    assert parse_duration("30d") == MAX_DURATION
    assert parse_duration("1.5m") == 90
    for bad in (float("inf"), float("nan"), 10**400, f"{NINES}s", "-1s", -1, True, "soon"):
        with pytest.raises(ValueError, match="invalid duration"):
            parse_duration(bad)


def test_a_run_time_setting_is_checked_like_the_file():
    server = ServerConfig(group_size=10, group_interval=parse_duration("1m"))
    assert apply_setting(server, "group_interval", "5m").group_interval == 300
    assert apply_setting(server, "rate", "none").rate is None
    for key, value, message in [
        ("group_interval", f"{NINES}s", "invalid duration"),
        ("rate", "1" * 400 + "/s", "invalid rate"),
        ("connections", "0", "Expected `int` >= 1"),
        ("connections", "many", "expected a whole number"),
        ("host", "x", "cannot be changed at run time"),
    ]:
        with pytest.raises(ConfigError, match=message) as raised:
            apply_setting(server, key, value)
        assert len(str(raised.value)) < 200, "the value is not echoed in full"
