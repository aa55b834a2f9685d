"""Beyond one process: workers on one machine, instances on many, one view of them.

- :mod:`~trisocks.fleet.workers`: ``--workers N`` processes sharing the listeners, supervised.
- :mod:`~trisocks.fleet.directory`, :mod:`~trisocks.fleet.channel`, :mod:`~trisocks.fleet.node`:
  the live session directory and cross-instance kills.

The store they share (SQLite or PostgreSQL) is :mod:`trisocks.store`.
"""
