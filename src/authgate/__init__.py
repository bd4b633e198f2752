"""authgate: API-token authorization for nginx auth_request and its cousins."""

__version__ = "0.1.0"
