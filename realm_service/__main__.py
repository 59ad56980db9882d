"""Entry point of realm_service."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("realm_service: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
