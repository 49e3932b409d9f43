"""`python -m muselab.bench module:function arguments`: one benchmark part in a child process
(`isolation.run_part` starts it)."""

from __future__ import annotations

import sys

from muselab.bench.isolation import child_main

if __name__ == "__main__":
    raise SystemExit(child_main(sys.argv[1:]))
