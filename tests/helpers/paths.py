"""Where the tests find the repository, their fixtures and the real data kept beside the repository."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = REPO_ROOT / "tests" / "fixtures"
MOCOSFL_FIXTURES = FIXTURES / "mocosfl"
SAMPLE_CIFAR10 = REPO_ROOT / "sample_data" / "cifar10"
SHARED = REPO_ROOT.parent / "shared"
# Real CIFAR-10 images (a trimmed official layout) kept beside the repository; override with SFL_CIFAR10_MINI.
CIFAR10_MINI = Path(os.environ.get("SFL_CIFAR10_MINI", SHARED / "data" / "cifar10-mini"))
