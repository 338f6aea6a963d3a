"""Check (or rewrite) the lock of our own set-up: every installed distribution pinned at its
installed version in constraints.txt.

    python scripts/check_lock.py constraints.txt          # exit 1 and list what drifted
    python scripts/check_lock.py --write constraints.txt  # rewrite it from this environment

`make install` runs the check after installing with `pip -c constraints.txt`, so a dependency
added to pyproject.toml without a pin fails the set-up (and CI) instead of floating.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HEADER = """\
# The exact versions of this project's own set-up (make demo, make test, CI), installed with
# pip's -c. The library's own requirements (pyproject.toml) are lower bounds; this file is
# what our results were measured with. Regenerate after changing a dependency: make lock
"""
# Not pinned: pip comes with the interpreter's venv; lorapro is the project itself.
UNPINNED = {"pip", "lorapro"}


def installed() -> dict[str, str]:
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and canonicalize_name(name) not in UNPINNED:
            found[canonicalize_name(name)] = f"{name}=={dist.version}"
    return found


def pinned(path: Path) -> dict[str, Requirement]:
    reqs = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        if len(specs) != 1 or specs[0].operator != "==":
            sys.exit(f"{path}:{n}: {line!r} is not an exact pin (name==version)")
        reqs[canonicalize_name(req.name)] = req
    return reqs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock", type=Path)
    parser.add_argument("--write", action="store_true", help="rewrite the lock from this environment")
    args = parser.parse_args()
    have = installed()
    if args.write:
        args.lock.write_text(HEADER + "".join(f"{have[k]}\n" for k in sorted(have)))
        print(f"wrote {len(have)} pins to {args.lock}")
        return 0
    pins = pinned(args.lock)
    problems = []
    for key, line in sorted(have.items()):
        version = line.split("==", 1)[1]
        if key not in pins:
            problems.append(f"{line} is installed but not pinned")
        elif not pins[key].specifier.contains(version, prereleases=True):
            problems.append(f"{line} is installed but {args.lock} pins {pins[key]}")
    if problems:
        print(f"{args.lock} does not describe this environment:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        print("Pin them (make lock rewrites the file from the installed set-up).", file=sys.stderr)
        return 1
    print(f"{args.lock}: all {len(have)} installed distributions are pinned at their versions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
