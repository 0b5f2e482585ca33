"""A leader's term (coordinator/term.py): a restore pauses it (its jobs
stopped, the leadership watch kept, commands held) and ends it without
stopping the process; a job that dies still stops the process."""

from __future__ import annotations

import asyncio

from clusteracme.coordinator.term import LEADERSHIP_WATCH, Term

from clusteracme.daemon import Supervisor


class Router:
    def __init__(self) -> None:
        self.held: str | None = None
        self.blocked: str | None = None

    def hold(self, detail: str) -> None:
        self.held = detail

    def block(self, detail: str) -> None:
        self.blocked = detail


class Part:
    def __init__(self) -> None:
        self.closed = self.idled = 0

    async def close(self) -> None:
        self.closed += 1

    async def wait_idle(self) -> None:
        self.idled += 1


class Work:
    def __init__(self) -> None:
        self.issuance, self.revocation, self.deployment = Part(), Part(), Part()


async def forever() -> None:
    await asyncio.Event().wait()


async def swallows_cancel() -> None:
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        return  # a job that ends quietly when cancelled


async def test_a_pause_stops_the_work_keeps_the_watch_and_holds_commands() -> None:
    sup, router, work = Supervisor(), Router(), Work()
    term = Term(sup, router)
    watch = term.spawn(LEADERSHIP_WATCH, forever())
    jobs = [term.spawn("renewal-scheduler", forever()), term.spawn("alarms", swallows_cancel())]
    term.attach(work)
    await asyncio.sleep(0)
    await term.pause("a restore is under way")
    assert router.held == "a restore is under way"
    assert all(job.cancelled() for job in jobs) and not watch.done()
    assert (work.issuance.closed, work.revocation.idled, work.deployment.idled) == (1, 1, 1)
    await term.close()
    assert watch.cancelled() and work.issuance.closed == 1  # the work is stopped once
    await asyncio.sleep(0)
    assert not sup.stopping.is_set() and not sup.failed  # a term ending is not a death


async def test_end_waits_for_the_app_to_end_the_term() -> None:
    term = Term(Supervisor(), Router())
    ending = asyncio.create_task(term.end())
    await asyncio.wait_for(term.end_requested.wait(), 1)
    assert not ending.done()
    term.ended.set()
    await asyncio.wait_for(ending, 1)


async def test_a_job_that_dies_still_stops_the_process() -> None:
    sup = Supervisor()
    term = Term(sup, Router())

    async def dies() -> None:
        raise RuntimeError("boom")

    term.spawn("retention", dies())
    await asyncio.wait_for(sup.stopping.wait(), 1)
    assert sup.failed


async def test_block_refuses_commands_for_the_term() -> None:
    router = Router()
    Term(Supervisor(), router).block("a restore was cut")
    assert router.blocked == "a restore was cut"
