"""Entry point of index_worker."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("index_worker: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
