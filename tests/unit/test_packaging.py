"""The wheel (issue 13, item 4). ``python -m build`` makes one top-level
package, ``clusteracme``: every folder of the repository holding an
``__init__.py`` is in pyproject's package list (none left out silently),
every module of those folders is in the wheel, ``deploy/`` is there as
``clusteracme.deploy`` with its units, example configs, nginx snippets,
polkit rule and install.sh (not dev-deps.sh), and the three entry points
import from the wheel alone. No module imports the folders' own names
(``coordinator``, ``peer_agent``): that would load a second copy of a module
next to ``clusteracme.coordinator``."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGES: list[str] = PYPROJECT["tool"]["setuptools"]["packages"]
PACKAGE_DIR: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
VERSION = PYPROJECT["project"]["version"]
DIST_INFO = f"clusteracme-{VERSION}.dist-info"
# Folders at the top of the repository that are not part of the product.
NOT_SHIPPED = {"tests", "bench", "build", "dist"}
# What the wheel is built from: pyproject's package-dir folders, pyproject.toml
# and its readme (deploy/install.sh's SHIPPED; a test checks both).
SHIPPED = ("clusteracme", "coordinator", "peer_agent", "deploy", "pyproject.toml", "README.md")
FOLDER_NAMES = ("coordinator", "peer_agent")  # installed as clusteracme.<name> only
ENTRY_POINTS = {"acme-coordinator": "clusteracme.coordinator.app:main",
                "acme-agent": "clusteracme.peer_agent.app:main",
                "acmectl": "clusteracme.ctl.main:main"}
DEV_ONLY = {"dev-deps.sh"}  # deploy/ files a node does not need


def _skipped(path: Path) -> bool:
    rel = path.relative_to(ROOT).parts
    return (any(part.startswith(".") or part == "__pycache__" or part.endswith(".egg-info") for part in rel)
            or (len(rel) > 1 and rel[0] in NOT_SHIPPED))


def _copy_file(src: str, dst: str) -> str:
    try:
        return shutil.copy2(src, dst)
    except FileNotFoundError:
        return dst  # gone since it was listed (an editor's temporary file)


def source_copy(dest: Path, root: Path = ROOT) -> Path:
    """The SHIPPED parts of the repository at ``root``, their regular files
    but caches and hidden ones: a build in the checkout would leave build/
    there (and a stale build/lib would ship modules removed since), and the
    rest of a working tree (a venv, logs being written, sockets, files
    coming and going) has no part in the wheel."""
    def ignore(directory: str, names: list[str]) -> set[str]:
        return {n for n in names if n.startswith(".") or n == "__pycache__" or n.endswith((".pyc", ".egg-info"))
                or not (os.path.isfile(os.path.join(directory, n)) or os.path.isdir(os.path.join(directory, n)))}
    dest.mkdir(parents=True)
    for part in SHIPPED:
        if (root / part).is_dir():
            shutil.copytree(root / part, dest / part, ignore=ignore, copy_function=_copy_file)
        else:
            shutil.copy2(root / part, dest / part)
    return dest


def build_wheel(out: Path) -> Path:
    """``python -m build`` (an sdist, then the wheel from it) with this
    interpreter's setuptools: no download."""
    pytest.importorskip("build", reason="the `build` package is in the test extra: pip install -e '.[test]'")
    src = source_copy(out / "src")
    result = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out / "dist"), str(src)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    wheels = sorted((out / "dist").glob("clusteracme-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        return {n for n in z.namelist() if not n.endswith("/")}


@pytest.fixture(scope="module")
def unpacked(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("unpacked")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)
    return target


def package_of(folder: Path) -> str | None:
    """The package pyproject's package-dir maps onto ``folder`` (the longest
    mapped folder containing it), or None."""
    rel = folder.relative_to(ROOT).as_posix()
    for package, mapped in sorted(PACKAGE_DIR.items(), key=lambda item: len(item[1]), reverse=True):
        if rel == mapped or rel.startswith(mapped + "/"):
            rest = rel[len(mapped):].strip("/")
            return f"{package}.{rest.replace('/', '.')}" if rest else package
    return None


def folder_of(package: str) -> Path:
    for mapped_package, mapped in sorted(PACKAGE_DIR.items(), key=lambda item: len(item[0]), reverse=True):
        if package == mapped_package or package.startswith(mapped_package + "."):
            rest = package[len(mapped_package):].strip(".")
            return ROOT / mapped / rest.replace(".", "/")
    return ROOT / package.replace(".", "/")


def test_the_source_copy_holds_the_shipped_parts_alone(tmp_path: Path) -> None:
    """A working tree with a venv, build leftovers, caches, a log and a
    socket of a running process, a fifo: the copy has the SHIPPED files."""
    tree = tmp_path / "tree"
    shipped = ["clusteracme/__init__.py", "clusteracme/v1/x_pb2.py", "coordinator/__init__.py",
               "peer_agent/__init__.py", "deploy/install.sh", "deploy/systemd/acme-agent.service",
               "pyproject.toml", "README.md"]
    junk = ["clusteracme/__pycache__/x.cpython-311.pyc", "clusteracme/.x.py.swp", "clusteracme.egg-info/PKG-INFO",
            "build/lib/clusteracme/removed.py", ".venv/bin/python", "notes/run.log", "tests/test_x.py",
            "proto/x.proto", "Makefile"]
    for rel in shipped + junk:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(rel)
    os.mkfifo(tree / "notes" / "fifo")
    os.mkfifo(tree / "clusteracme" / "fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tree / "clusteracme" / "agent.sock"))
        copy = source_copy(tmp_path / "copy", root=tree)
    found = sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*") if not p.is_dir())
    assert found == sorted(shipped)
    assert all((copy / rel).read_text() == rel for rel in shipped)


def test_the_shipped_parts_are_what_pyproject_builds_from() -> None:
    """SHIPPED here and in install.sh: pyproject's package-dir folders,
    pyproject.toml and its readme, nothing else."""
    assert set(SHIPPED) == {*PACKAGE_DIR.values(), "pyproject.toml", PYPROJECT["project"]["readme"]}
    line = re.search(r"^SHIPPED=\((.*)\)$", (ROOT / "deploy" / "install.sh").read_text(), re.M)
    assert line is not None and tuple(line.group(1).split()) == SHIPPED


def test_the_wheel_holds_the_clusteracme_package_alone(names: set[str], unpacked: Path) -> None:
    tops = {name.split("/")[0] for name in names}
    assert tops == {"clusteracme", DIST_INFO}, sorted(tops)
    assert (unpacked / DIST_INFO / "top_level.txt").read_text().split() == ["clusteracme"]


def test_every_package_folder_is_listed_and_every_module_shipped(names: set[str]) -> None:
    folders = sorted(p.parent for p in ROOT.rglob("__init__.py") if not _skipped(p))
    assert folders, "no package folder found"
    for folder in folders:
        package = package_of(folder)
        assert package is not None, f"{folder.relative_to(ROOT)}/ holds an __init__.py but no package maps onto it"
        assert package in PACKAGES, f"{folder.relative_to(ROOT)}/ ({package}) is missing from [tool.setuptools] packages"
    for package in PACKAGES:
        assert (folder_of(package) / "__init__.py").is_file(), f"{package}: {folder_of(package)} has no __init__.py"
        assert package.split(".")[0] == "clusteracme", f"{package} is not under clusteracme"
    # Every module of the shipped folders is in the wheel (a subfolder without
    # __init__.py would otherwise be left out without a word).
    for package, mapped in PACKAGE_DIR.items():
        for module in (ROOT / mapped).rglob("*.py"):
            if _skipped(module):
                continue
            inner = module.relative_to(ROOT / mapped).as_posix()
            assert f"{package.replace('.', '/')}/{inner}" in names, f"{module.relative_to(ROOT)} is not in the wheel"


def test_the_deploy_assets_are_package_data(wheel: Path, names: set[str], unpacked: Path) -> None:
    deploy = ROOT / "deploy"
    shipped = {p.relative_to(deploy).as_posix() for p in deploy.rglob("*")
               if p.is_file() and not _skipped(p) and p.suffix != ".pyc"}
    expected = {f"clusteracme/deploy/{rel}" for rel in shipped - DEV_ONLY}
    assert {n for n in names if n.startswith("clusteracme/deploy/")} == expected
    for must in ("install.sh", "systemd/acme-agent.service", "systemd/acme-coordinator.service",
                 "systemd/50-clusteracme-nginx-reload.rules", "config/agent.toml", "config/coordinator.toml",
                 "nginx-acme-challenge.conf", "nginx-acme-challenge-server.conf", "__main__.py"):
        assert f"clusteracme/deploy/{must}" in names, must
    for rel in shipped - DEV_ONLY:
        assert (unpacked / "clusteracme" / "deploy" / rel).read_bytes() == (deploy / rel).read_bytes(), rel
    assert not any(n.endswith("dev-deps.sh") for n in names)
    # Executable in the wheel: pip keeps the bit when it installs.
    with zipfile.ZipFile(wheel) as z:
        assert (z.getinfo("clusteracme/deploy/install.sh").external_attr >> 16) & 0o111


def test_entry_points_import_from_the_wheel_alone(unpacked: Path) -> None:
    text = (unpacked / DIST_INFO / "entry_points.txt").read_text()
    section = text.split("[console_scripts]", 1)[1].split("\n[", 1)[0]
    found = dict(line.replace(" ", "").split("=", 1) for line in section.strip().splitlines())
    assert found == ENTRY_POINTS
    probe = """
import importlib, json, sys
out = {}
for name, target in json.loads(sys.argv[1]).items():
    module, func = target.split(":")
    mod = importlib.import_module(module)
    out[name] = [mod.__file__, callable(getattr(mod, func, None))]
for name in ("coordinator", "peer_agent"):
    try:
        importlib.import_module(name)
        out[name] = "importable"
    except ModuleNotFoundError:
        out[name] = "absent"
print(json.dumps(out))
"""
    # Run in the unpacked wheel, with this venv's dependencies: nothing of the
    # repository on the path (its editable finder comes after sys.path).
    result = subprocess.run([sys.executable, "-B", "-c", probe, json.dumps(ENTRY_POINTS)], cwd=unpacked,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(unpacked)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    for name in ENTRY_POINTS:
        module_file, is_callable = out[name]
        assert module_file.startswith(str(unpacked) + "/"), f"{name} imported {module_file}, not the wheel's"
        assert is_callable, f"{name}: {ENTRY_POINTS[name]} is not a function"
    assert out["coordinator"] == out["peer_agent"] == "absent"


def test_python_m_clusteracme_deploy_prints_where_the_assets_are(unpacked: Path) -> None:
    result = subprocess.run([sys.executable, "-B", "-m", "clusteracme.deploy"], cwd=unpacked,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(unpacked)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assets = Path(result.stdout.strip())
    assert assets == unpacked / "clusteracme" / "deploy"
    assert (assets / "install.sh").is_file() and (assets / "systemd" / "acme-agent.service").is_file()
    wrong = subprocess.run([sys.executable, "-B", "-m", "clusteracme.deploy", "instal"], cwd=unpacked,
                           env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(unpacked)},
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr


# --- hygiene: nothing imports the folders' own names ---------------------------

def _modules_in(folder: str) -> set[str]:
    base = ROOT / folder
    return {p.stem for p in base.glob("*.py")} | {p.parent.name for p in base.glob("*/__init__.py")}


def folder_name_imports(source: str, filename: str = "<source>") -> list[str]:
    """Where ``source`` imports ``coordinator``/``peer_agent`` by the folder's
    own name: import statements, and strings that are a dotted path into one
    (``mock.patch`` targets, ``-m`` arguments, ``importlib.import_module``)."""
    found = []
    known = {name: _modules_in(name) for name in FOLDER_NAMES}
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = re.fullmatch(r"(coordinator|peer_agent)\.(\w+)(\.\w+)*", node.value)
            modules = [node.value] if match and match.group(2) in known[match.group(1)] else []
        else:
            continue
        found += [f"{filename}:{node.lineno}: {m}" for m in modules if m.split(".")[0] in FOLDER_NAMES]
    return found


def test_the_import_check_finds_each_form() -> None:
    sample = ('import coordinator.app\nfrom peer_agent import keys\nfrom coordinator.store.keys import Keys\n'
              'from clusteracme.coordinator import issuance\nfrom . import orders\n'
              'patch("coordinator.issuance.Issuer")\nargs = ["-m", "peer_agent.app"]\nlog = "coordinator.log"\n')
    assert [f.split(": ")[1] for f in folder_name_imports(sample)] == [
        "coordinator.app", "peer_agent", "coordinator.store.keys", "coordinator.issuance.Issuer", "peer_agent.app"]


def test_no_module_imports_coordinator_or_peer_agent_by_the_folder_name() -> None:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if any(part.startswith(".") or part in ("__pycache__", "build") or part.endswith(".egg-info")
               for part in rel.parts) or path == Path(__file__).resolve():  # this file's samples
            continue
        found += folder_name_imports(path.read_text(), str(rel))
    for path in [ROOT / "Makefile", ROOT / "README.md", *sorted((ROOT / "deploy").rglob("*.sh")),
                 *sorted((ROOT / "deploy").rglob("*.service"))]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"-m\s+(coordinator|peer_agent)\b", line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "use clusteracme.coordinator / clusteracme.peer_agent:\n" + "\n".join(found)
