"""The build's import check: ``python -m mlserve_runtime.check APP_DIR`` imports app.py like a worker does.

An import error fails the image build with the traceback's tail, rather than a 502 later.
"""

from __future__ import annotations

import sys
import traceback

from .loader import AppLoadError, load


def main(argv: list[str]) -> int:
    app_dir = argv[1] if len(argv) > 1 else "."
    try:
        loaded = load(app_dir)
    except AppLoadError as exc:
        print(f"mlserve: {exc}", file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001 - whatever the user's module raised
        text = traceback.format_exc().rstrip().splitlines()
        print("\n".join(text[-20:]), file=sys.stderr)
        print(f"mlserve: app.py failed to import: {text[-1]}", file=sys.stderr)
        return 1
    print(f"mlserve: app.py imports; global app is {loaded.kind}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
