"""Thin HTTP routes: parse, call the serving layer, return its result."""
