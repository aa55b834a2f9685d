"""trisocks: a SOCKS5 proxy (RFC 1928, RFC 1929) on trio, and a trio SOCKS5 client."""

__version__ = "0.1.0"
