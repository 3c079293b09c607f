"""Run infrastructure: processes and devices, errors, files, logs, precision, checkpoint files, compatibility switches."""
