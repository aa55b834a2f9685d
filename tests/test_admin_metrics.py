"""``/metrics``: parses as Prometheus text and counts what happened; per-user series fold."""

from __future__ import annotations

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.admin_support import admin_proxy, api, auth_status, echo_round, session_of
from tests.conftest import USER, Proxy, open_connect
from trisocks.admin.metrics import OTHER_USERS, fold_users

__all__ = ["admin_proxy", "api"]  # fixtures used by name


async def test_metrics_parse_and_count(
    admin_proxy: Proxy, api: httpx.AsyncClient, echo_server: tuple[str, int]
) -> None:
    with trio.fail_after(10):
        assert await auth_status(admin_proxy, USER, "wrong") != 0
        async with await open_connect(admin_proxy, echo_server) as stream:
            await echo_round(stream, b"m" * 700)
            await session_of(api)
            response = await api.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }
    assert samples[("trisocks_sessions", (("command", "CONNECT"), ("state", "relaying")))] == 1
    assert samples[("trisocks_bytes_total", (("direction", "up"),))] == 700
    assert samples[("trisocks_handshake_failures_total", (("reason", "auth_failed"),))] == 1
    assert samples[("trisocks_user_bytes_total", (("direction", "down"), ("user", USER)))] == 700
    assert samples[("trisocks_user_active_sessions", (("user", USER),))] == 1
    assert samples[("trisocks_sessions_started_total", ())] == 2
    assert ("trisocks_udp_reassemblies_total", ()) in samples


def test_per_user_series_are_bounded() -> None:
    rows = [
        {"user": f"u{i:02d}", "active_sessions": 1, "sessions_total": 2, "bytes_up": i,
         "bytes_down": 1, "datagrams_up": 0, "datagrams_down": 3}
        for i in range(25)
    ]
    folded = fold_users(rows, 20)
    assert [r["user"] for r in folded] == [f"u{i:02d}" for i in range(24, 4, -1)] + [OTHER_USERS]
    assert folded[-1] == {"user": OTHER_USERS, "active_sessions": 5, "sessions_total": 10,
                          "bytes_up": 0 + 1 + 2 + 3 + 4, "bytes_down": 5, "datagrams_up": 0,
                          "datagrams_down": 15}
    assert fold_users(rows[:3], 20) == sorted(rows[:3], key=lambda r: -r["bytes_up"])
