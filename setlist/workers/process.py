"""``setlist-process``: Prefect's process worker that takes tenant runs only with a grant
(``setlist.dispatch.grants``), for the local pool.
"""

from __future__ import annotations

from prefect.workers.process import ProcessWorker

from setlist.dispatch.grants import GrantedRunsOnly


class SetlistProcessWorker(GrantedRunsOnly, ProcessWorker):
    type = "setlist-process"
    _display_name = "Setlist Process"
    _description = "Runs Setlist jobs as local processes, in the dispatcher's order."
