"""Bundled tierserve configuration files (YAML), shipped as package data."""
