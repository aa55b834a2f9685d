"""GSS-API (RFC 1961) on trio, shared by the server and the client library.

``stream`` needs only trio: frames on a connection and :class:`~trisocks.gss.stream.GssStream`
(which the server relays like any stream). ``mech`` drives the ``gssapi`` package (the
optional extra ``trisocks[gssapi]``) and is imported only once GSSAPI is actually used.
"""
