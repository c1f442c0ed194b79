"""The error every data reader raises: its own module, so that the loaders
(``megarlhf.data.load``) and the prepared-data cache they read hub sources through
(``megarlhf.data.hub``) share it without importing each other."""

__all__ = ["DataError"]


class DataError(ValueError):
    """Data that cannot be loaded as configured."""
