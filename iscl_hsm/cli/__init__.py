"""The `iscl` command line."""
