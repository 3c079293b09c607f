"""--compat: MocoSFL's option names mean MocoSFL's behaviour; its bugs are fixed unless --compat mocosfl asks for them.

Where MocoSFL's behaviour is a choice (a head, a view, an initialisation, an order of updates) the default follows
it. Where it is a bug (see docs/mocosfl.md, "Differences"), the default keeps the fix and `--compat mocosfl`
reproduces MocoSFL's code as it ran, so that a published number can be re-run as it was produced.
"""
from __future__ import annotations

import argparse

COMPAT_MODES = ("none", "mocosfl")


def mocosfl_compat(args: argparse.Namespace) -> bool:
    """Whether the run reproduces MocoSFL's bugs (--compat mocosfl); runs saved before the option have none."""
    return getattr(args, "compat", "none") == "mocosfl"
