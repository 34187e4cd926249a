"""Bridges from other tools into qapframe; each module imports its tool only when that tool loads it."""
