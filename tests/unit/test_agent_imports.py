"""What an idle agent carries (issue 8: at most 60 MB resident): the daemon
module does not import aiohttp (the HTTP listeners), josepy or acme
(revocation) until a path that needs them runs, and the paths that do still
work from their first call.

Each case runs in a fresh interpreter: in this one the other tests have
imported everything already.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAZY = ("aiohttp", "yarl", "multidict", "josepy", "acme")

pytestmark = pytest.mark.timeout(60)


def run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            cwd=ROOT, timeout=50)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_the_agent_daemon_module_imports_no_listener_or_revocation_code() -> None:
    out = run(f"""
        import sys
        import clusteracme.peer_agent.app
        print(sorted(m for m in {LAZY!r} if m in sys.modules))
    """)
    assert out.strip() == "[]"


def test_an_idle_closed_front_agent_loads_aiohttp_at_its_first_challenge_and_serves_it() -> None:
    out = run("""
        import asyncio, socket, sys, tempfile
        from pathlib import Path
        from clusteracme.peer_agent.app import build_deployer
        from clusteracme.peer_agent.challenges import ChallengeService
        from clusteracme.peer_agent.keys import KeyStore
        from clusteracme.peer_agent.settings import AgentSettings
        from clusteracme.config import build

        TOKEN, THUMB = "tok1", "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"

        async def main():
            state = Path(tempfile.mkdtemp())
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            settings = build(AgentSettings, {"peer_id": "p1", "state_dir": str(state),
                                             "endpoints": [{"listen": f"127.0.0.1:{port}"}]})
            deployer = build_deployer(settings, KeyStore(state))
            await deployer.start()  # no certificate yet: the endpoint waits for one
            service = ChallengeService("127.0.0.1", 0, "closed")
            await service.start()
            print("idle", "aiohttp" in sys.modules)
            await service.present("o1", {TOKEN: f"{TOKEN}.{THUMB}"}, 60)
            print("challenge", "aiohttp" in sys.modules)
            reader, writer = await asyncio.open_connection("127.0.0.1", service.front_port)
            writer.write(f"GET /.well-known/acme-challenge/{TOKEN} HTTP/1.1\\r\\nHost: a.example:80\\r\\n"
                         "Connection: close\\r\\n\\r\\n".encode())
            print("served", (await reader.read()).endswith(f"{TOKEN}.{THUMB}".encode()))
            writer.close()
            await service.stop()
            await deployer.stop()

        asyncio.run(main())
    """)
    assert out.split("\n")[:3] == ["idle False", "challenge True", "served True"]


def test_a_redirect_front_listens_from_start() -> None:
    out = run("""
        import asyncio, sys
        from clusteracme.peer_agent.challenges import ChallengeService

        async def main():
            service = ChallengeService("127.0.0.1", 0, "redirect")
            await service.start()
            reader, writer = await asyncio.open_connection("127.0.0.1", service.front_port)
            writer.write(b"GET /x HTTP/1.1\\r\\nHost: a.example\\r\\nConnection: close\\r\\n\\r\\n")
            print((await reader.read()).split(b"\\r\\n")[0].decode())
            writer.close()
            await service.stop()

        asyncio.run(main())
    """)
    assert out.strip() == "HTTP/1.1 301 Moved Permanently"


def test_a_bad_proxy_upstream_is_still_refused_when_the_endpoint_is_built() -> None:
    out = run("""
        from clusteracme.peer_agent.tls_endpoint import TLSEndpoint
        try:
            TLSEndpoint("127.0.0.1", 0, peer_id="p1", upstream="ftp://127.0.0.1:21/x")
        except ValueError as exc:
            print("refused:", exc)
    """)
    assert out.startswith("refused: upstream must be http(s)://host:port")
