#!/usr/bin/env python3
"""A longer fuzz run than CI's: the protocol decoder, the envelope loader
and a live daemon fed hostile frames, with as many hypothesis examples as
you ask for (CI runs 2000 per property).

    python scripts/fuzz.py                  # 50,000 examples per property
    python scripts/fuzz.py --examples 200000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests" / "test_hardening.py"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=50_000, help="hypothesis examples per property")
    args = parser.parse_args()
    env = {**os.environ, "TRACTOR_SESSION_FUZZ_EXAMPLES": str(args.examples)}
    return subprocess.call(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS), "-k", "fuzz"],
        env=env,
    )


if __name__ == "__main__":
    sys.exit(main())
