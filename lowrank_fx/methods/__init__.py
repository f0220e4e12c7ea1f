"""Adapter methods: one file each. A method turns a list of targets into adapter groups."""
