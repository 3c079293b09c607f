"""Helper modules shared by run_sflmoco.py and run_sflswav.py."""
