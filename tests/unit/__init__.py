"""Unit tests: no token, card or network needed."""
