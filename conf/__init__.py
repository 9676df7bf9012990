"""Hydra configs shipped as a package so `pkg://fedbgmd.conf` finds them."""
