"""imatdata: download, clean and describe image datasets given as URL lists."""

__version__ = "0.1.0"
