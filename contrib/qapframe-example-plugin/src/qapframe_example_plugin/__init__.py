"""Example qapframe plugin; qapframe finds these classes through the entry points in pyproject.toml."""
