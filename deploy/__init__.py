"""What a node needs besides the code, shipped in the wheel as package data.

The repository's ``deploy/`` folder installs as ``clusteracme.deploy``
(pyproject's package-dir): the systemd units and the polkit rule
(``systemd/``), the example configs (``config/``), the nginx snippets and
``install.sh``, which sets a node up from a wheel or from a source checkout.
``python -m clusteracme.deploy`` prints where they are. ``dev-deps.sh``
(system packages for ``make test``) stays in the repository.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
INSTALL_SH = ASSETS / "install.sh"
