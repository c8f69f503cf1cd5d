"""edgekd: take a big accurate model, ship a small fast one to the edge."""

__version__ = "0.1.0"
