"""The admin API: a quart-trio app served by Hypercorn inside the proxy's own trio run.

Layout: :mod:`.server` starts it in the root nursery; :mod:`.app` builds the app from the
route modules (:mod:`.sessions_api`, :mod:`.users_api`, :mod:`.events`, :mod:`.metrics`,
:mod:`.static`); :mod:`.shapes` owns the JSON names other tools rely on; :mod:`.revocation` ends
sessions whose credentials are gone; :mod:`.cli` is the command-line client.
"""
