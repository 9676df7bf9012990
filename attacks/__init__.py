"""fedbgmd.attacks (folder `attacks/`, importable only as `fedbgmd.attacks`)."""
