"""The plain-PyTorch adapters over the check engine: ``evaluating()`` (``context``) and ``validate()`` (``loop``)."""
