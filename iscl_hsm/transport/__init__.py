"""Transports: the engine driven over a blocking socket or asyncio streams."""
