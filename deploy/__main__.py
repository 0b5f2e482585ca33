"""``python -m clusteracme.deploy`` prints the folder of the deploy assets;
``python -m clusteracme.deploy install ARGS...`` runs its install.sh with ARGS
(pip does not keep the script's executable bit)."""

from __future__ import annotations

import os
import shutil
import sys

from clusteracme.deploy import ASSETS, INSTALL_SH

USAGE = "usage: python -m clusteracme.deploy [install [install.sh options...]]"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(ASSETS)
        return 0
    if args[0] in ("-h", "--help"):
        print(f"{USAGE}\nWithout arguments: print the folder holding install.sh, the units and example configs.")
        return 0
    if args[0] != "install":
        print(f"unknown command {args[0]!r}; {USAGE}", file=sys.stderr)
        return 2
    bash = shutil.which("bash")
    if bash is None:
        print("bash is needed to run install.sh and was not found on PATH", file=sys.stderr)
        return 1
    os.execv(bash, [bash, str(INSTALL_SH), *args[1:]])
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
