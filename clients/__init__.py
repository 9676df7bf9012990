"""fedbgmd.clients (folder `clients/`, importable only as `fedbgmd.clients`)."""
