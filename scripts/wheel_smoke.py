"""Install the built wheel as a user would and train one step from it, not from the source tree.

    python scripts/wheel_smoke.py --venv build/smoke-venv --wheel-dir dist

Creates a fresh virtual environment, installs the wheel into it with ``--no-deps`` (pip of the
running interpreter, ``--python``), and makes the running environment's packages (torch, peft,
...) visible to it through a ``.pth`` line, which adds that site-packages folder to ``sys.path``
but does not run the ``.pth`` files in it, so the editable install of this checkout stays out.
Then runs scripts/smoke_installed.py with the new interpreter from a scratch folder.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import venv
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, required=True)
    parser.add_argument("--wheel-dir", type=Path, required=True)
    args = parser.parse_args()
    wheels = sorted(args.wheel_dir.glob("lorapro-*.whl"))
    if len(wheels) != 1:
        sys.exit(f"wheel_smoke: expected one lorapro wheel in {args.wheel_dir}, found {wheels}")
    if args.venv.exists():
        shutil.rmtree(args.venv)
    venv.EnvBuilder(with_pip=False, clear=True).create(args.venv)
    python = (args.venv / "bin" / "python").absolute()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-index",
            str(wheels[0].absolute()),
        ],
        check=True,
    )
    smoke_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(smoke_site) / "test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    with tempfile.TemporaryDirectory() as scratch:
        smoke = [str(python), str(HERE / "smoke_installed.py"), "--site", smoke_site]
        smoke += ["--bin", str(python.parent)]
        result = subprocess.run(smoke, cwd=scratch)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
