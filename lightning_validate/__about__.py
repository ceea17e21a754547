"""Version of lightning-validate, read by the build backend and the package."""

__version__ = "0.3.0.dev0"
