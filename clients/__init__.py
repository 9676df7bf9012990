"""Simulated honest (and Byzantine) clients; importable only as ``fedbgmd.clients``."""

from fedbgmd.clients.honest import ClientRuntime, make_client_app

__all__ = ["ClientRuntime", "make_client_app"]
