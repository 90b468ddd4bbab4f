"""The running service: the BentoML service class, the ASGI front, connection limits,
authentication, the launcher and start-failure reporting."""
