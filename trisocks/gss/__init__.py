"""GSS-API (RFC 1961) on trio, shared by the server and the client library.

``stream`` needs only trio: frames on a connection, :class:`~trisocks.gss.stream.GssStream`
and its relay. ``mech`` drives the ``gssapi`` package (the optional extra
``trisocks[gssapi]``) and is imported only once GSSAPI is actually used.
"""
