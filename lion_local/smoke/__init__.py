"""Smoke mode: tiny local LLaMA models, built on first use, so a run needs no download."""
