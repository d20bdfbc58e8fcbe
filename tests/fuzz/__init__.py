"""A mutation fuzzer for the sans-I/O engine: real sessions, mutated, fed to a fresh Connection.

``corpus`` records whole links between two engines (both profiles, every suite), ``mutate`` changes
them (frames dropped, duplicated, reordered, spliced, header fields and bytes edited, arbitrary
chunkings), ``oracle`` runs one input and says what is wrong with it, ``campaign`` is the command
line (``python3 -m tests.fuzz.campaign``, ``make fuzz``). See docs/fuzzing.md.
"""
