"""Users, per-user accounting and limits: one interface, two backends, one cache.

- :mod:`~trisocks.store.interface`: what is asked of a store (:class:`UserStore`).
- :mod:`~trisocks.store.records`: its value types and errors.
- :mod:`~trisocks.store.sqlite` (the embedded default), :mod:`~trisocks.store.postgres` (shared
  by a fleet), both on the SQL helpers of :mod:`~trisocks.store.sql`.
- :mod:`~trisocks.store.cache`: what the server reads from, in memory, kept in sync.
- :mod:`~trisocks.store.open`: the one function that opens a store from a ``db`` setting.
"""
