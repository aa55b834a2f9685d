"""The ``trisocks`` command line, on top of everything else (nothing in trisocks imports it).

Layout: :mod:`.main` builds the parser and runs a command; :mod:`.common` holds what every
command shares (the parser class, error and warning lines, opening the store);
:mod:`.config_flags` turns ``--config`` and the per-key flags into a config for
:mod:`.serve` and :mod:`.check`; :mod:`.users` edits users and their limits; :mod:`.admin`
(``sessions``, ``usage``) talks to a running server's admin API through :mod:`.admin_client`.
"""
