"""The library version, written into adapter files and manifests."""

__version__ = "0.1.0"
