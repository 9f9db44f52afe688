"""A Kubernetes Job runs its flow run only from the submission it was created for.

When Kueue preempts a Job it suspends it: the pod gets SIGTERM, Prefect puts the flow run
back to Scheduled, and the dispatcher may grant it again, so a worker creates a second
Job for the same run. Kueue later re-admits the suspended Job, and the Job controller
starts a new pod in it — which would run the flow run a second time, beside the new Job.

So Setlist's Kubernetes worker writes into each Job the id of the flow run's state at
submission (``SETLIST_SUBMITTED_STATE``, the Pending state the worker moved it to), and
the Job's container starts with this guard: it runs the flow run's command only while
the run is still in that very state. Any later submission, reschedule or start changes
the state, so a re-admitted Job exits at once (status 0, the run untouched), and one
preempted before its pod ever started resumes normally (the state is still its own).

    python -m setlist.job_guard -- prefect flow-run execute
"""

from __future__ import annotations

import os
import sys
import uuid

STATE_ENV = "SETLIST_SUBMITTED_STATE"
RUN_ENV = "PREFECT__FLOW_RUN_ID"


async def current_state_id(run_id: str) -> str | None:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        run = await client.read_flow_run(uuid.UUID(run_id))
    return str(run.state_id) if run.state_id else None


def superseded(run_id: str | None, submitted: str | None) -> str | None:
    """Why this Job must not run its flow run, or None when it may."""
    if not run_id or not submitted:
        return None  # not a Setlist submission: nothing to compare
    import anyio

    from setlist.core.reach import waiting_out_outages

    # The pod may start while the API is away (a server restart): wait it out, bounded.
    current = waiting_out_outages(
        lambda: anyio.run(current_state_id, run_id), what=f"reading flow run {run_id}"
    )
    if current != submitted:
        return (
            f"flow run {run_id} has moved on since this Job was created (state {current}, "
            f"submitted as {submitted}): not running it a second time"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python -m setlist.job_guard -- COMMAND...", file=sys.stderr)
        return 2
    reason = superseded(os.environ.get(RUN_ENV), os.environ.get(STATE_ENV))
    if reason:
        print(reason, flush=True)
        return 0
    os.execvp(args[0], args)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
