"""``setlist-process``: Prefect's process worker that takes tenant runs only with a grant
(``setlist.dispatch.grants``), for the local pool, records each run it takes on the audit
trail (``audited``), and starts each with its run token in place of the worker's own
credentials (``job_credentials``); a job that dies before its flow starts gives the run
back to the dispatcher (``unstarted``).
"""

from __future__ import annotations

from prefect.workers.process import ProcessWorker

from setlist.dispatch.grants import GrantedRunsOnly
from setlist.workers.audited import AuditedStarts
from setlist.workers.job_credentials import check_run_overrides, job_environment
from setlist.workers.unstarted import GivesBackUnstarted


class SetlistProcessWorker(GivesBackUnstarted, AuditedStarts, GrantedRunsOnly, ProcessWorker):
    type = "setlist-process"
    _display_name = "Setlist Process"
    _description = "Runs Setlist jobs as local processes, in the dispatcher's order."

    async def run(self, flow_run, configuration, task_status=None):
        # Raising here is the refusal: Prefect marks the run Crashed with this reason.
        check_run_overrides(flow_run)
        configuration.env = job_environment(configuration.env, flow_run)
        return await super().run(flow_run, configuration, task_status)
