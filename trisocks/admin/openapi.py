"""The OpenAPI 3.1 document of the admin API, served at ``/api/openapi.json``.

Written by hand next to the code it describes; ``tests/test_admin_openapi.py`` keeps it true:
the document validates, its paths and methods are exactly the app's routes, and live answers
validate against the schemas below.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OPENAPI"]

_COUNT = {"type": "integer", "minimum": 0}
_NULLABLE_STRING = {"type": ["string", "null"]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    """An object with exactly these properties, all present."""
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


def _error(description: str) -> dict[str, Any]:
    return _json(description, _ref("Error"))


def _operation(summary: str, ok: dict[str, Any], *errors: str, **extra: Any) -> dict[str, Any]:
    """One operation; *errors* are status codes answered with the error shape."""
    text = {"400": "Bad input: a malformed body or parameter (the message says what)",
            "401": "Missing or wrong bearer token",
            "404": "No such session or user", "409": "The user already exists",
            "413": "The request body is over 64 KiB",
            "415": "The request body is not JSON in UTF-8",
            "503": "The store (or, in a fleet, the shared database) is unavailable; the message "
                   "names the cause, as in `store unavailable: database is locked`"}
    responses = {**ok, **{code: _error(text[code]) for code in ("401", *errors)}}
    return {"summary": summary, "responses": responses, **extra}


_FILTERS = [
    {"name": "user", "in": "query", "schema": {"type": "string"},
     "description": "Sessions of this user."},
    {"name": "command", "in": "query",
     "schema": {"enum": ["CONNECT", "BIND", "UDP", "RESOLVE", "RESOLVE_PTR"]}},
    {"name": "client", "in": "query", "schema": {"type": "string"},
     "description": "Client address inside this IP address or CIDR network."},
    {"name": "target_host", "in": "query", "schema": {"type": "string"},
     "description": "Target host as the client asked (case-insensitive)."},
    {"name": "target_port", "in": "query",
     "schema": {"type": "integer", "minimum": 1, "maximum": 65535}},
]
_SESSION_ID = {"name": "session_id", "in": "path", "required": True, "schema": {"type": "string"}}
_USER_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
              "description": "An account: a store user (alice) or source:name for another "
                             "source (ldap:alice, gssapi:bob; the colon may be sent as %3A)."}
_SOURCES = ["store", "pam", "ldap", "http", "gssapi", "tls", None]
_NO_CONTENT = {"204": {"description": "Done"}}
_KILLED = {"200": _json("How many sessions were told to end", _ref("Killed"))}
_PASSWORD = {"type": "string", "minLength": 1, "maxLength": 255,
             "description": "1..255 bytes in UTF-8 (RFC 1929)."}
_PUBLIC: list[dict[str, list[str]]] = []
_USER_FIELDS = {
    "user": {"type": "string", "description": "the account: a store user's name, source:name "
             "for another source (ldap:alice); (anonymous) for sessions without auth"},
    "source": {"enum": _SOURCES, "description": "what vouched for the identity; null for "
               "(anonymous)"},
    "active_sessions": _COUNT,
    "sessions_total": _COUNT,
    "bytes_up": _COUNT,
    "bytes_down": _COUNT,
    "datagrams_up": _COUNT,
    "datagrams_down": _COUNT,
    "last_seen": {"type": ["string", "null"], "format": "date-time"},
}
_POLICY_FIELDS = {
    "limits": _ref("Limits"),
    "quota_used": _object({"day": _COUNT, "month": _COUNT}),
}

_SCHEMAS: dict[str, Any] = {
    "Error": _object({"error": {"type": "string"}}),
    "Killed": _object({"killed": _COUNT}),
    "Session": _object({
        "id": {"type": "string"},
        "user": {**_NULLABLE_STRING, "description": "the account (store name, or source:name)"},
        "source": {"enum": _SOURCES, "description": "what vouched for the user; null when "
                   "anonymous"},
        "client": {"type": "string", "description": "host:port; IPv6 as [::1]:port"},
        "command": {"enum": ["CONNECT", "BIND", "UDP", "RESOLVE", "RESOLVE_PTR", None],
                    "description": "null until the request is read"},
        "target": {**_NULLABLE_STRING, "description": "host:port as the client asked"},
        "resolved": {**_NULLABLE_STRING, "description": "ip:port actually used"},
        "egress": {**_NULLABLE_STRING, "description": "the source IP its traffic left from, "
                   "when its rule gives egress (docs/routing.md); null otherwise"},
        "parent": {**_NULLABLE_STRING, "description": "the via parent it went through, as "
                   "scheme://host:port (docs/routing.md); null when direct"},
        "protocol": {"enum": ["socks5", "socks4", "http-connect", "http"],
                     "description": "how the client spoke (docs/protocols.md)"},
        "tls": {"type": "boolean", "description": "the client connection is TLS"},
        "state": {"enum": ["handshake", "connecting", "relaying", "closing"]},
        "started_at": {"type": "string", "format": "date-time"},
        "bytes_up": {**_COUNT, "description": "payload bytes client -> target"},
        "bytes_down": {**_COUNT, "description": "payload bytes target -> client"},
        "datagrams_up": _COUNT,
        "datagrams_down": _COUNT,
        "instance": {**_NULLABLE_STRING, "description": "host/pid of the fleet instance "
                     "serving it; null outside a fleet"},
    }),
    "SessionList": _object({"sessions": {"type": "array", "items": _ref("Session")}}),
    "User": _object(_USER_FIELDS),
    "UserList": _object({"users": {"type": "array", "items": _ref("User")}}),
    "Limits": _object({
        "max_sessions": {"type": ["integer", "null"], "minimum": 1},
        "max_session_duration": {"type": ["number", "null"], "description": "seconds"},
        "rate_up": {"type": ["integer", "null"], "description": "bytes/s, client to targets"},
        "rate_down": {"type": ["integer", "null"], "description": "bytes/s, targets to client"},
        "quota_day": {"type": ["integer", "null"], "description": "bytes per UTC day"},
        "quota_month": {"type": ["integer", "null"], "description": "bytes per UTC month"},
    }),
    "UserPolicy": _object(_POLICY_FIELDS),
    "UserDetail": _object({**_USER_FIELDS, **_POLICY_FIELDS}),
    "Reloaded": _object({
        "rules": _COUNT,
        "ended": {**_COUNT, "description": "sessions the new rules or users no longer allow"},
        "restart_needed": {"type": "array", "items": {"type": "string"},
                           "description": "changed keys that keep their value until a restart"},
    }),
    "NewUser": _object({"user": {"type": "string"}, "password": _PASSWORD}),
    "NewPassword": _object({"password": _PASSWORD}),
    "Stats": _object({
        "started_at": {"type": "string", "format": "date-time"},
        "uptime": {"type": "number", "description": "seconds"},
        "sessions_active": _COUNT,
        "sessions_total": _COUNT,
        "sessions_by_state": {"type": "object", "additionalProperties": _COUNT},
        "sessions_by_command": {"type": "object", "additionalProperties": _COUNT},
        "bytes_up": _COUNT,
        "bytes_down": _COUNT,
        "handshake_failures": {"type": "object", "additionalProperties": _COUNT},
        "udp_dropped": {"type": "object", "additionalProperties": _COUNT},
        "udp_reassembled": _COUNT,
        "rejected_over_limit": _COUNT,
        "instance": {**_NULLABLE_STRING, "description": "host/pid of this fleet instance (the "
                     "sessions' `instance`); null outside a fleet"},
    }),
    "Health": _object({"status": {"enum": ["ok", "stopping"]}}),
}

_EVENTS_DOC = (
    "Server-sent events. Each message is `event: start|update|end` with one `data:` line "
    "holding a SessionList. The first message is a `start` with every live session. `start` "
    "and `end` are batched every 0.25 s, `update` (sessions whose record changed) once per "
    "second. A subscriber that falls behind is disconnected; reconnect to resynchronise."
)

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "trisocks admin API",
        "version": "1",
        "description": "Live sessions, kills, per-user accounting and user management of one "
        "trisocks server. Every /api route needs `Authorization: Bearer <token>`. Errors are "
        "`{\"error\": \"...\"}`: 4xx for bad input, 503 (naming the cause) when the store "
        "fails.",
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": _SCHEMAS,
    },
    "security": [{"bearer": []}],
    "paths": {
        "/api/sessions": {
            "get": _operation("Live sessions", {"200": _json("Sessions", _ref("SessionList"))},
                              "400", "503", parameters=_FILTERS),
            "delete": _operation("Kill the sessions matching the filters (at least one)",
                                 _KILLED, "400", "503", parameters=_FILTERS),
        },
        "/api/sessions/{session_id}": {
            "get": _operation("One live session", {"200": _json("Session", _ref("Session"))},
                              "404", "503", parameters=[_SESSION_ID]),
            "delete": _operation("Kill one session: its connections close at once",
                                 _NO_CONTENT, "404", "503", parameters=[_SESSION_ID]),
        },
        "/api/events": {
            "get": _operation("Session events (SSE)", {"200": {
                "description": _EVENTS_DOC,
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            }}),
        },
        "/api/users": {
            "get": _operation("Every user's usage (persisted plus live)",
                              {"200": _json("Users", _ref("UserList"))}, "503"),
            "post": _operation(
                "Add a user", {"201": _json("The new user", _ref("User"))}, "400", "409", "413",
                "415", "503",
                requestBody={"required": True, "content": {
                    "application/json": {"schema": _ref("NewUser")}}},
            ),
        },
        "/api/users/{name}": {
            "get": _operation("One user's usage, limits and quota use",
                              {"200": _json("User", _ref("UserDetail"))}, "404", "503",
                              parameters=[_USER_NAME]),
            "delete": _operation("Remove a user and end its sessions", _NO_CONTENT, "404",
                                 "503", parameters=[_USER_NAME]),
        },
        "/api/users/{name}/password": {
            "put": _operation(
                "Change a user's password and end its sessions", _NO_CONTENT, "400", "404",
                "413", "415", "503", parameters=[_USER_NAME],
                requestBody={"required": True, "content": {
                    "application/json": {"schema": _ref("NewPassword")}}},
            ),
        },
        "/api/users/{name}/limits": {
            "get": _operation("A user's limits and quota use",
                              {"200": _json("Limits", _ref("UserPolicy"))}, "404", "503",
                              parameters=[_USER_NAME]),
            "put": _operation(
                "Change some of a user's limits (null clears one); applies within a second",
                {"200": _json("Limits", _ref("UserPolicy"))}, "400", "404", "413", "415", "503",
                parameters=[_USER_NAME],
                requestBody={"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "properties": _SCHEMAS["Limits"]["properties"],
                    "additionalProperties": False}}}},
            ),
        },
        "/api/reload": {
            "post": _operation(
                "Re-read config, rules and users; end the sessions they no longer allow",
                {"200": _json("Reloaded", _ref("Reloaded"))}, "400", "503",
            ),
        },
        "/api/users/{name}/sessions": {
            "delete": _operation("Kill every session of a user", _KILLED, "404", "503",
                                 parameters=[_USER_NAME]),
        },
        "/api/stats": {
            "get": _operation("Server totals", {"200": _json("Stats", _ref("Stats"))}),
        },
        "/api/openapi.json": {
            "get": _operation("This document", {"200": _json("OpenAPI 3.1", {"type": "object"})}),
        },
        "/metrics": {
            "get": _operation(
                "Prometheus metrics (public when the server runs with metrics_public)",
                {"200": {"description": "Prometheus text format",
                         "content": {"text/plain": {"schema": {"type": "string"}}}}}, "503",
                security=[{"bearer": []}, {}],
            ),
        },
        "/healthz": {
            "get": {"summary": "Liveness", "security": _PUBLIC, "responses": {
                "200": _json("Listening", _ref("Health")),
                "503": _json("Shutting down", _ref("Health")),
            }},
        },
        "/": {
            "get": {"summary": "The dashboard (index.html)", "security": _PUBLIC, "responses": {
                "200": {"description": "HTML", "content": {"text/html": {}}},
                "404": _error("The dashboard is not installed"),
            }},
        },
        "/{name}": {
            "get": {
                "summary": "A dashboard file (the name may contain '/')",
                "security": _PUBLIC,
                "parameters": [{"name": "name", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {"200": {"description": "The file"}, "404": _error("No such file")},
            },
        },
    },
}
