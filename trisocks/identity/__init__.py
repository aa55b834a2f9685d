"""Who a session is: identities vouched for by the store, PAM, LDAP, an HTTP hook, Kerberos or
a TLS client certificate, and the chain of password backends that checks RFC 1929 and HTTP
``Basic`` logins.

- :mod:`~trisocks.identity.model`: :class:`Identity` ``(source, name, groups)``, its account
  name, the backend interface and its errors.
- :mod:`~trisocks.identity.logins`: the chain (``password_backends``, first answer wins), its
  cache, per-backend counters and what revalidation needs.
- Backends: :mod:`~trisocks.identity.store` (scrypt table), :mod:`~trisocks.identity.pam`,
  :mod:`~trisocks.identity.ldap`, :mod:`~trisocks.identity.hook`.
"""
