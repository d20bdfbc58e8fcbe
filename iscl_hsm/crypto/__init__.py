"""Host-side cryptography that ISCL needs and the ``cryptography`` package does not offer."""
