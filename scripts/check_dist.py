"""Check the release files under a dist folder beyond what `twine check` does.

    python scripts/check_dist.py dist

- exactly one sdist and one wheel, both of the version written in src/lorapro/__init__.py;
- the wheel's core requirements are lower bounds (no ==, ===, ~= or < in Requires-Dist), torch
  and peft among them, nothing else in the core; every extra the README documents exists;
- the wheel ships lorapro/py.typed and the LICENSE, and no tests or benchmarks.
"""

from __future__ import annotations

import ast
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
CORE = {"torch", "peft"}
EXTRAS = {"trainer", "plots", "bench", "demo", "deepspeed", "dev"}


def source_version() -> str:
    tree = ast.parse((ROOT / "src/lorapro/__init__.py").read_text())
    for node in tree.body:
        names = [getattr(t, "id", None) for t in getattr(node, "targets", [])]
        if isinstance(node, ast.Assign) and "__version__" in names:
            return ast.literal_eval(node.value)
    raise SystemExit("src/lorapro/__init__.py has no __version__ = '...'")


def check(dist: Path) -> list[str]:
    problems: list[str] = []
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        return [f"expected one wheel and one sdist in {dist}, found {[p.name for p in (*wheels, *sdists)]}"]
    version = source_version()
    with zipfile.ZipFile(wheels[0]) as whl:
        names = whl.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(whl.read(meta_name).decode())
    if meta["Version"] != version:
        problems.append(f"wheel version {meta['Version']} != __version__ {version}")
    if f"lorapro-{version}.tar.gz" != sdists[0].name:
        problems.append(f"sdist {sdists[0].name} is not lorapro-{version}.tar.gz")
    core, extras = set(), set(meta.get_all("Provides-Extra") or [])
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        pins = [s for s in req.specifier if s.operator in ("==", "===", "~=", "<", "<=", "!=")]
        if pins:
            problems.append(f"Requires-Dist {line!r}: only lower bounds (>=) belong in the wheel")
        if req.marker is None:
            core.add(req.name)
            if not any(s.operator == ">=" for s in req.specifier):
                problems.append(f"core requirement {line!r} has no tested lower bound")
    if core != CORE:
        problems.append(f"core requirements are {sorted(core)}, expected {sorted(CORE)}")
    if not extras >= EXTRAS:
        problems.append(f"extras missing from the wheel: {sorted(EXTRAS - extras)}")
    for required in ("lorapro/py.typed", "lorapro/__init__.py"):
        if required not in names:
            problems.append(f"wheel lacks {required}")
    if not any(n.endswith("licenses/LICENSE") for n in names):
        problems.append("wheel lacks the LICENSE file")
    stray = [n for n in names if n.split("/")[0] in ("tests", "benchmarks", "examples", "scripts")]
    if stray:
        problems.append(f"wheel ships non-library files: {stray[:5]}")
    with tarfile.open(sdists[0]) as sdist:
        if not any(n.endswith("/src/lorapro/py.typed") for n in sdist.getnames()):
            problems.append("sdist lacks src/lorapro/py.typed")
    return problems


def main() -> int:
    dist = Path(sys.argv[1] if len(sys.argv) > 1 else "dist")
    problems = check(dist)
    for p in problems:
        print(f"check_dist: {p}", file=sys.stderr)
    if not problems:
        print(f"check_dist: {dist}: version {source_version()}, lower bounds only, py.typed and LICENSE in")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
