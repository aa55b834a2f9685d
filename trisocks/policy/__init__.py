"""Who may go where, how often and how much: sans-IO rules, limits and quotas.

The server applies them in :mod:`trisocks.server.admission`, ``.judge``, ``.user_limits`` and
``.reservations``; nothing in this package touches a socket or reads a clock (quotas read the
store, which callers pass in).
"""

from trisocks.policy.limits import AuthBackoff, Counts, KeyedRate, TokenBucket
from trisocks.policy.matching import Decision, Query, Rule
from trisocks.policy.quotas import UserLimits, parse_size, quota_exceeded
from trisocks.policy.rule_parsing import DEFAULT_RULES, RuleError, parse_rules
from trisocks.policy.rules import RuleSet

__all__ = [
    "DEFAULT_RULES",
    "AuthBackoff",
    "Counts",
    "Decision",
    "KeyedRate",
    "Query",
    "Rule",
    "RuleError",
    "RuleSet",
    "TokenBucket",
    "UserLimits",
    "parse_rules",
    "parse_size",
    "quota_exceeded",
]
