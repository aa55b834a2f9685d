"""Server configuration: one frozen :class:`Config`, from defaults, a TOML file and flags.

Every key of the TOML file is also a ``trisocks serve`` flag (``idle_timeout`` is
``--idle-timeout``); flags win over the file. :func:`build_config` validates everything and
raises :class:`ConfigError` naming the key at fault.

The package's modules, lowest first:

- :mod:`~trisocks.config.values`: :class:`Endpoint` and :class:`ConfigError`.
- :mod:`~trisocks.config.keys`: every key's converter (:data:`KEYS`).
- :mod:`~trisocks.config.settings`: :class:`Config`, each key's default and meaning.
- :mod:`~trisocks.config.build`: :func:`load_file`, :func:`build_config` and the checks.

Every name importers use is re-exported here.
"""

from trisocks.config.build import (
    build_config,
    config_problems,
    config_warnings,
    load_file,
    read_token_file,
)
from trisocks.config.keys import KEYS, is_db_url
from trisocks.config.settings import Config, default_db_path
from trisocks.config.values import ConfigError, Endpoint

__all__ = [
    "KEYS", "Config", "ConfigError", "Endpoint", "build_config", "config_problems",
    "config_warnings", "default_db_path", "is_db_url", "load_file", "read_token_file",
]
