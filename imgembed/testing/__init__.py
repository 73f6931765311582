"""Test fixtures that ship with imgembed (e.g. :mod:`.outliers`: random weights that quantize like trained ones)."""
