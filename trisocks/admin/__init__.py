"""The admin API: a quart-trio app served by Hypercorn inside the proxy's own trio run.

Layout: :mod:`.server` starts it in the root nursery; :mod:`.app` builds the app (bearer check
with :mod:`.tokens`, JSON errors from :mod:`.errors`) from the route modules
(:mod:`.sessions_api` with :mod:`.filters` and :mod:`.events`, :mod:`.users_api`,
:mod:`.status_api` with :mod:`.metrics` and :mod:`.openapi`, :mod:`.static`); :mod:`.shapes`
owns the JSON names other tools rely on. The command-line client of this API is in
:mod:`trisocks.cli` (:mod:`trisocks.cli.admin`, :mod:`trisocks.cli.admin_client`), above it.
"""
