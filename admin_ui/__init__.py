"""The browser dashboard's static files, served by the admin API at ``/``.

Plain HTML, CSS and JavaScript modules: no build step. ``STATIC_DIR`` is where they are."""

from pathlib import Path

STATIC_DIR = Path(__file__).parent
