"""storage/config.py: defaults and refusals (Order No. 82 art. 13: at least 60 days)."""

from __future__ import annotations

import pytest

from storage.config import StoreConfig, StoreConfigError


def test_defaults():
    c = StoreConfig()
    assert (c.retention_days, c.timezone, c.commit_interval_ms, c.overflow) == (180, "Asia/Shanghai", 200, "fail-open")
    assert c.forensic is False


@pytest.mark.parametrize("kw, message", [
    ({"retention_days": 59}, "retention_days=59 is below the legal minimum of 60 days"),
    ({"retention_days": 0}, "Order No. 82"),
    ({"timezone": "Mars/Olympus"}, "not a known IANA time zone"),
    ({"overflow": "drop"}, "overflow='drop' must be"),
    ({"batch_max": 0}, "batch_max=0 must be at least 1"),
    ({"queue_max": 0}, "queue_max=0"),
    ({"synchronous": "OFF"}, "synchronous='OFF'"),
    ({"syslog": "http://siem"}, "syslog='http://siem'"),
])
def test_refused_values_name_the_field(kw, message):
    with pytest.raises(StoreConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        StoreConfig(**kw)


def test_sixty_days_is_accepted():
    assert StoreConfig(retention_days=60).retention_days == 60
