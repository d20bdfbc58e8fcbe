"""A virtual ISCL card for tests, demos and practising ceremonies (never for patient data).

:mod:`.state` is the card's memory (a JSON file), :mod:`.applet` answers APDUs, :mod:`.vpcd` plugs the
applet into the vsmartcard virtual reader of pcscd. See docs/smart-cards.md.
"""
