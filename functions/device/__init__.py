"""A real client of a run: the device command and its certificates."""
