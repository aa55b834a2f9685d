"""Sans-IO policy: rules (one test per kind of condition), token buckets, backoff, sizes."""

from __future__ import annotations

import ipaddress
import math
from typing import Any

import pytest

from trisocks.config import ConfigError, build_config
from trisocks.policy import (
    DEFAULT_RULES,
    AuthBackoff,
    KeyedRate,
    Query,
    RuleError,
    RuleSet,
    TokenBucket,
    UserLimits,
    parse_rules,
    parse_size,
    quota_exceeded,
)
from trisocks.policy.quotas import MAX_LIMIT, check_limit

ip = ipaddress.ip_address


def q(**fields: Any) -> Query:
    base: dict[str, Any] = {
        "client": ip("192.0.2.10"), "user": "alice", "command": "connect",
        "host": None, "ip": ip("198.51.100.7"), "port": 443,
    }
    base.update(fields)
    return Query(**base)


def decide(rules: list[dict[str, Any]], query: Query, default: bool = True, **kw: Any) -> Any:
    return RuleSet(parse_rules(rules), default_allow=default, **kw).decide(query)


@pytest.mark.parametrize(
    ("rule", "hit", "miss"),
    [
        ({"from": "192.0.2.0/24"}, q(), q(client=ip("203.0.113.1"))),
        ({"users": ["alice"]}, q(), q(user="bob")),
        ({"users": ["alice"]}, q(), q(user=None)),
        ({"commands": ["bind", "udp"]}, q(command="bind"), q()),
        ({"to": ["198.51.100.0/24"]}, q(), q(ip=ip("203.0.113.9"))),
        ({"to": ["2001:db8::/32"]}, q(ip=ip("2001:db8::1")), q()),
        ({"to": ["example.com"]}, q(host="EXAMPLE.com."), q(host="www.example.com")),
        ({"to": ["*.example.com"]}, q(host="a.b.example.com"), q(host="example.com")),
        ({"ports": [22, "8000-8080"]}, q(port=8080), q(port=8081)),
    ],
)
def test_each_condition_matches_and_misses(rule: dict[str, Any], hit: Query, miss: Query) -> None:
    rules = [{"id": "r", "action": "deny", **rule}]
    assert decide(rules, hit) is not None and decide(rules, hit).rule_id == "r"
    assert decide(rules, miss).rule_id == "default"


def test_first_match_wins_and_default_is_explicit() -> None:
    rules = [
        {"id": "allow-web", "action": "allow", "ports": [443]},
        {"id": "deny-net", "action": "deny", "to": "198.51.100.0/24"},
    ]
    assert decide(rules, q()).rule_id == "allow-web"
    assert decide(rules, q(port=80)).rule_id == "deny-net"
    assert decide(rules, q(port=80, ip=ip("203.0.113.1")), default=False).allowed is False


def test_groups_expand_in_users() -> None:
    rules = [{"id": "staff", "action": "deny", "users": ["@staff"]}]
    groups = {"staff": ["bob"]}
    assert decide(rules, q(user="bob"), groups=groups).rule_id == "staff"
    assert decide(rules, q(user="alice"), groups=groups).rule_id == "default"


def test_groups_from_the_source_match_group_entries() -> None:
    rules = [{"id": "staff", "action": "deny", "users": ["@staff"]},
             {"id": "named", "action": "deny", "users": ["ldap:carol"]}]
    groups = {"staff": ["bob"]}
    ldap_staff = q(user="ldap:alice", groups=frozenset({"staff", "dev"}))
    assert decide(rules, ldap_staff, groups=groups).rule_id == "staff"
    assert decide(rules, q(user="ldap:alice", groups=frozenset({"dev"})),
                  groups=groups).rule_id == "default"
    # the config group still counts, and a source group need not be in the config at all
    assert decide(rules, q(user="bob"), groups=groups).rule_id == "staff"
    assert decide(rules, ldap_staff).rule_id == "staff"
    # a qualified name is its own user: "carol" from the store is not "ldap:carol"
    assert decide(rules, q(user="ldap:carol"), groups=groups).rule_id == "named"
    assert decide(rules, q(user="carol"), groups=groups).rule_id == "default"
    # an anonymous session has no user, whatever groups a query claims
    assert decide(rules, q(user=None, groups=frozenset({"staff"}))).rule_id == "default"


@pytest.mark.parametrize(("backends", "error"), [
    ("store", "rules: group @ops is not defined in groups"),
    ("store,ldap", None),
    ("http", None),
])
def test_undefined_groups_are_allowed_only_with_an_external_backend(
        backends: str, error: str | None) -> None:
    settings = {"rules": [{"id": "ops", "action": "allow", "users": ["@ops"]}],
                "password_backends": backends.split(","),
                "ldap_url": "ldap://127.0.0.1:1", "ldap_user_dn": "uid={user},dc=test",
                "auth_hook_url": "http://127.0.0.1:1/auth"}
    if error is None:
        build_config(settings, {})
        return
    with pytest.raises(ConfigError, match=error):
        build_config(settings, {})


def test_a_name_waits_for_addresses_when_a_cidr_rule_comes_first() -> None:
    rules = RuleSet(parse_rules(DEFAULT_RULES), default_allow=True, admin=("127.0.0.1", 8080))
    name = q(host="metadata.example", ip=None)
    assert rules.decide(name) is None  # the link-local rule hangs on the address
    denied = rules.decide_resolved(name, [ip("192.0.2.1"), ip("169.254.169.254")])
    assert (denied.allowed, denied.rule_id) == (False, "link-local")
    assert rules.decide_resolved(name, [ip("192.0.2.1")]).allowed


def test_a_name_rule_decides_without_resolving() -> None:
    rules = [{"id": "no-evil", "action": "deny", "to": "*.evil.test"},
             {"id": "ll", "action": "deny", "to": "169.254.0.0/16"}]
    assert decide(rules, q(host="x.evil.test", ip=None)).rule_id == "no-evil"


def test_admin_rule_covers_only_the_admin_port_and_loopback_for_wildcards() -> None:
    rules = RuleSet(parse_rules(DEFAULT_RULES), default_allow=True, admin=("0.0.0.0", 8080))
    assert rules.decide(q(ip=ip("127.0.0.5"), port=8080)).rule_id == "admin-endpoint"
    local = ip("127.0.0.1")  # a client on this host: proxy-host does not apply to it
    assert rules.decide(q(client=local, ip=ip("127.0.0.5"), port=8081)).rule_id == "default"
    no_admin = RuleSet(parse_rules(DEFAULT_RULES), default_allow=True, admin=None)
    assert no_admin.decide(q(client=local, ip=ip("127.0.0.1"), port=8080)).rule_id == "default"


def test_udp_association_is_judged_per_datagram() -> None:
    rules = [{"id": "r", "action": "deny", "to": "198.51.100.0/24", "ports": [53]}]
    assert decide(rules, q(command="udp", ip=None, port=None)) is None


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ([{"action": "maybe"}], "action must be allow or deny"),
        ([{"action": "deny", "to": "bad host/x"}], "is not a CIDR"),
        ([{"action": "deny", "ports": "99999"}], "not a range"),
        ([{"action": "deny", "commands": ["ping"]}], "commands"),
        ([{"action": "deny", "colour": 1}], "unknown field 'colour'"),
        ([{"id": "a", "action": "deny"}, {"id": "a", "action": "allow"}], "used twice"),
    ],
)
def test_bad_rules_are_named(rules: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(RuleError, match=message):
        parse_rules(rules)


def test_config_rejects_undefined_group_and_reads_rules_file(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="group @ops"):
        build_config({"rules": [{"action": "deny", "users": "@ops"}]}, {})
    path = tmp_path / "rules.toml"
    path.write_text('[[rules]]\nid = "x"\naction = "deny"\nports = [25]\n')
    assert build_config({}, {"rules": str(path)}).rules[0].id == "x"


def test_token_bucket_pays_debt_at_rate() -> None:
    bucket = TokenBucket(rate=100, burst=50)
    assert bucket.consume(50, 0.0) == 0
    assert bucket.consume(100, 0.0) == pytest.approx(1.0)
    assert bucket.consume(0, 1.0) == 0  # debt paid after a second
    assert not bucket.try_take(10, 1.0) and bucket.try_take(10, 1.1)


def test_keyed_rate_is_per_key() -> None:
    rate = KeyedRate(rate=1, burst=2)
    assert [rate.allow("a", 0) for _ in range(3)] == [True, True, False]
    assert rate.allow("b", 0) and rate.allow("a", 1.0)


def test_auth_backoff_doubles_caps_and_forgets() -> None:
    backoff = AuthBackoff(3, base=1, cap=8)
    assert [backoff.failed("ip", 0) for _ in range(6)] == [0, 0, 1, 2, 4, 8]
    assert backoff.failed("ip", 0) == 8 and backoff.blocked("ip", 7) == 1
    backoff.succeeded("ip")
    assert backoff.blocked("ip", 7) == 0
    backoff.failed("ip", 0)
    assert backoff.blocked("ip", 100) == 0 and len(backoff) == 0


def test_auth_backoff_survives_a_very_long_streak() -> None:
    backoff = AuthBackoff(5, base=1, cap=1)
    now = 0.0
    for _ in range(5000):  # retrying as each block ends: the streak is never forgotten
        now += backoff.blocked("ip", now)
        assert backoff.failed("ip", now) <= 1  # was OverflowError (2.0**1024) at try 1029


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("max_sessions", 0, "greater than 0"),
        ("max_sessions", 1.5, "whole number"),
        ("max_sessions", True, "whole number"),
        ("quota_day", 1 << 63, "at most"),  # SQLite INTEGER would raise OverflowError
        ("max_session_duration", math.nan, "greater than 0"),  # trio refuses NaN deadlines
        ("max_session_duration", math.inf, "at most"),
        ("rate_up", "5", "whole number"),
    ],
)
def test_check_limit_refuses(field: str, value: object, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        check_limit(field, value)


def test_check_limit_accepts() -> None:
    for field, value in [("max_sessions", MAX_LIMIT), ("max_session_duration", 0.5),
                         ("quota_month", 1), ("rate_down", None)]:
        check_limit(field, value)


def test_sizes_and_quotas() -> None:
    assert [parse_size(t) for t in ("1500", "64k", "10M", "2GiB")] == [
        1500, 64 << 10, 10 << 20, 2 << 30]
    for text in ("lots", "9" * 400):  # the second would be int(inf): OverflowError
        with pytest.raises(ValueError, match="not a size"):
            parse_size(text)
    limits = UserLimits(quota_day=100, quota_month=1000)
    assert quota_exceeded(limits, 99, 500) is None
    assert quota_exceeded(limits, 100, 500) == "daily"
    assert quota_exceeded(limits, 0, 1000) == "monthly"
