"""The ETL core on both storage backends: exact counts, incremental, idempotent, crash-safe,
and the same result whatever the batch size or the number of staging workers.

Loads here stage with the default number of workers (one per CPU, so worker processes
on any machine with two or more), unless a test says otherwise."""

from __future__ import annotations

import json

import pyarrow.compute as pc
import pytest

from setlist.core.storage import tenant_storage
from setlist.etl.curated import MANIFEST_KEY, TABLE_PREFIX, read_events, read_manifest
from setlist.etl.demo import raw_files
from setlist.etl.load import TooManyBadRows, load_new_files

# Tasks run outside a flow here: they still report to the session's server.
pytestmark = pytest.mark.server


@pytest.fixture
def storage(prefect_server, storage_config):
    return tenant_storage("acme", storage_config)


@pytest.fixture
def load(storage_config):
    """load_new_files with the store's config, which worker processes open it from."""

    def load(storage, tenant_id, **kwargs):
        return load_new_files(storage, tenant_id, storage_config=storage_config, **kwargs)

    return load


def _put(storage, files):
    for key, data in files.items():
        storage.put_bytes(key, data)


def _curated(storage) -> dict[str, bytes]:
    return {k: storage.get_bytes(k) for k in storage.list_keys("curated")}


def test_exact_counts_through_the_pipeline(storage, load):
    files, expected = raw_files("acme", events=12_000, files=3, defect_share=0.05)
    _put(storage, files)
    report = load(storage, "acme", batch_rows=2_000)
    assert report.files == 3 and report.lines == 12_000
    by_reason = {k: v for k, v in expected.items() if k not in ("valid", "duplicate")}
    assert report.rejects_by_reason == {k: v for k, v in by_reason.items() if v}
    assert report.rejected == sum(by_reason.values())
    assert report.duplicates == expected["duplicate"]
    assert report.loaded_rows == expected["valid"]
    table = read_events(storage)
    assert table.num_rows == expected["valid"] == report.table_rows
    assert pc.count_distinct(table["event_id"]).as_py() == table.num_rows
    assert pc.unique(table["tenant_id"]).to_pylist() == ["acme"]
    quarantined = [
        json.loads(line)
        for key in storage.list_keys("quarantine")
        for line in storage.get_text(key).splitlines()
    ]
    assert len(quarantined) == report.rejected
    assert {q["reason"] for q in quarantined} == set(report.rejects_by_reason)
    assert all(q["source"].startswith("raw/") and q["line"] > 0 for q in quarantined)


def test_rerun_loads_nothing_and_changes_nothing(storage, load):
    files, _ = raw_files("acme", events=3_000, files=2)
    _put(storage, files)
    first = load(storage, "acme")
    before = _curated(storage)
    again = load(storage, "acme")
    assert again.files == 0 and again.loaded_rows == 0
    assert again.table_version == first.table_version
    assert _curated(storage) == before


def test_later_files_load_incrementally_and_dedupe_across_loads(storage, load):
    files, expected = raw_files("acme", events=4_000, files=2, defect_share=0)
    keys = sorted(files)
    storage.put_bytes(keys[0], files[keys[0]])
    first = load(storage, "acme")
    storage.put_bytes(keys[1], files[keys[1]])
    # a partner re-sends the first file under a new name: all duplicates
    storage.put_bytes("raw/resend/events-000.jsonl.gz", files[keys[0]])
    second = load(storage, "acme")
    assert second.files == 2
    assert second.duplicates == first.loaded_rows
    assert first.loaded_rows + second.loaded_rows == expected["valid"] == 4_000
    assert read_events(storage).num_rows == 4_000
    assert read_manifest(storage).version == 2


def test_a_planted_manifest_or_partition_file_is_refused(storage, load):
    """The tenant's credential can write under ``curated/``: a manifest it edits (say,
    to drop a date or point at its own file) or a partition file it swaps is refused by
    every reader and by the next load, and nothing is published over it."""
    from setlist.core.records import UnsealedRecord

    files, _ = raw_files("acme", events=2_000, files=1, defect_share=0)
    _put(storage, files)
    load(storage, "acme")
    manifest = read_manifest(storage)
    date, part = sorted(manifest.partitions.items())[0]
    real = storage.get_bytes(part.key)
    storage.put_bytes(part.key, storage.get_bytes(part.key)[:-64] + b"\0" * 64)
    with pytest.raises(UnsealedRecord, match="digest differs"):
        read_events(storage)
    storage.put_bytes(part.key, real)

    sealed = storage.get_bytes(MANIFEST_KEY)
    edited = json.loads(sealed)
    del edited["partitions"][date]
    storage.put_bytes(MANIFEST_KEY, json.dumps(edited).encode())
    before = _curated(storage)
    for read in (read_manifest, read_events):
        with pytest.raises(UnsealedRecord, match="does not verify"):
            read(storage)
    storage.put_bytes("raw/later.jsonl", b"")
    with pytest.raises(UnsealedRecord):
        load(storage, "acme")
    assert _curated(storage) == before  # nothing published over the planted manifest
    storage.put_bytes(MANIFEST_KEY, sealed)
    assert read_events(storage).num_rows == manifest.rows


def _twin(config):
    """The same backend, another root: a second, independent copy of tenant 'acme'."""
    from blocks.storage import LocalStorageConfig

    if isinstance(config, LocalStorageConfig):
        return config.model_copy(update={"root": config.root + "-twin"})
    return config.model_copy(update={"prefix": config.prefix + "-twin"})


def test_crash_midway_then_rerun_is_byte_identical_to_a_clean_run(
    prefect_server, storage_config, monkeypatch
):
    files, _ = raw_files("acme", events=6_000, files=3, defect_share=0.03)
    clean = tenant_storage("acme", storage_config)
    crashed = tenant_storage("acme", _twin(storage_config))
    _put(clean, files)
    _put(crashed, files)
    load_new_files(clean, "acme", batch_rows=1_000, storage_config=storage_config)

    real_put = type(crashed).put_bytes
    writes = {"n": 0}

    def dying_put(self, key, data):
        if self is crashed and key.startswith("curated/"):
            writes["n"] += 1
            if writes["n"] == 5:  # the process dies after 4 partition files
                raise KeyboardInterrupt("killed")
        return real_put(self, key, data)

    monkeypatch.setattr(type(crashed), "put_bytes", dying_put)
    with pytest.raises(KeyboardInterrupt):
        load_new_files(crashed, "acme", batch_rows=1_000, storage_config=_twin(storage_config))
    monkeypatch.setattr(type(crashed), "put_bytes", real_put)
    assert writes["n"] == 5
    assert not crashed.exists(MANIFEST_KEY)  # readers still see the previous (empty) table
    assert read_events(crashed).num_rows == 0
    # the rerun uses another batch size: the output must not depend on it either
    load_new_files(crashed, "acme", batch_rows=4_000, storage_config=_twin(storage_config))
    assert _curated(crashed) == _curated(clean)
    assert len(_curated(clean)) == 15  # 14 dates + the manifest


def test_a_failed_partition_write_is_retried_from_the_scratch_files(
    prefect_server, storage_config, monkeypatch
):
    """A date's scratch files go only once its file is written: a write that fails is
    retried by its task from them, and the table is the one a clean load publishes."""
    files, _ = raw_files("acme", events=3_000, files=2, defect_share=0.02)
    clean = tenant_storage("acme", storage_config)
    flaky = tenant_storage("acme", _twin(storage_config))
    _put(clean, files)
    _put(flaky, files)
    load_new_files(clean, "acme", storage_config=storage_config)

    real_put = type(flaky).put_bytes
    failed = []

    def put_failing_once(self, key, data):
        if self is flaky and key.startswith(TABLE_PREFIX) and "/date=" in key and not failed:
            failed.append(key)
            raise OSError("connection reset by peer")
        return real_put(self, key, data)

    monkeypatch.setattr(type(flaky), "put_bytes", put_failing_once)
    report = load_new_files(flaky, "acme", storage_config=_twin(storage_config))
    assert failed and report.loaded_rows == read_events(clean).num_rows
    assert _curated(flaky) == _curated(clean)


def _quarantined(storage) -> dict[str, bytes]:
    return {k: storage.get_bytes(k) for k in storage.list_keys("quarantine")}


def test_staging_workers_change_nothing_but_speed(prefect_server, storage_config):
    """One process, or this one and two worker processes: the same table bytes, the same
    quarantine files and the same report, load after load."""
    from datetime import UTC, datetime

    files, _ = raw_files("acme", events=9_000, files=4, defect_share=0.04)
    files["raw/extra/events.csv"] = (
        b"event_id,user_id,track_id,artist_id,ts,ms_played,country\n"
        b"c1,u,t,a,2026-11-03T01:00:00Z,500,se\nc2,u,t,a,not-a-time,500,SE\n"
    )
    (first, *_) = sorted(files)
    files["raw/cut.jsonl.gz"] = files[first][: len(files[first]) // 2]
    files["raw/resend.jsonl.gz"] = files[first]  # all duplicates
    later, _ = raw_files("acme", events=3_000, files=1, defect_share=0.04)
    now = datetime(2026, 11, 20, tzinfo=UTC)
    stores = {1: storage_config, 3: _twin(storage_config)}
    reports = {}
    for workers, config in stores.items():
        storage = tenant_storage("acme", config)
        _put(storage, files)
        kwargs = {"batch_rows": 1_000, "now": now, "storage_config": config, "workers": workers}
        reports[workers] = [load_new_files(storage, "acme", max_bad_share=0.5, **kwargs)]
        _put(storage, {f"raw/later/{k.rsplit('/', 1)[1]}": v for k, v in later.items()})
        reports[workers].append(load_new_files(storage, "acme", max_bad_share=0.5, **kwargs))
    one, many = (tenant_storage("acme", c) for c in stores.values())
    assert _curated(one) == _curated(many)
    assert _quarantined(one) == _quarantined(many)
    assert len(_quarantined(one)) == 8  # every raw file has rejects
    timing = {"seconds", "events_per_s"}
    for a, b in zip(reports[1], reports[3], strict=True):
        assert a.model_dump(exclude=timing) == b.model_dump(exclude=timing)
    assert reports[1][0].files == 7 and reports[1][0].duplicates > 0
    assert reports[1][1].files == 1 and reports[1][1].table_version == 2


def test_a_config_of_another_store_is_refused(storage, storage_config):
    from setlist.core.tenancy import SetlistError

    _put(storage, raw_files("acme", events=1_000, files=2)[0])
    with pytest.raises(SetlistError, match="storage_config names"):
        load_new_files(storage, "acme", workers=2, storage_config=_twin(storage_config))


def test_hostile_files_are_counted_not_crashes(storage, load):
    good = (
        b'{"event_id":"e1","user_id":"u","track_id":"t","artist_id":"a",'
        b'"ts":"2026-11-02T10:00:00+00:00","ms_played":1000}\n'
    )
    (full,) = raw_files("acme", events=2_000, files=1, defect_share=0)[0].values()
    storage.put_bytes("raw/truncated.jsonl.gz", full[: len(full) * 6 // 10])
    storage.put_bytes("raw/empty.jsonl", b"")
    huge = b'{"event_id":"' + b"x" * (10 << 20) + b'"}\n'
    storage.put_bytes("raw/huge-line.jsonl", huge + good.replace(b"e1", b"e2"))
    storage.put_bytes("raw/latin1.jsonl", good.replace(b"e1", b"e3").replace(b'"u"', b'"\xe9"'))
    storage.put_bytes(
        "raw/events.csv",
        b"event_id,user_id,track_id,artist_id,ts,ms_played,country\n"
        b"c1,u,t,a,2026-11-03T01:00:00Z,500,se\n"
        b"c2,u,t,a,not-a-time,500,SE\n"
        b"c3,u,t,a,2026-11-03T01:00:00Z\n",
    )
    report = load(storage, "acme", max_bad_share=1.0)
    assert report.files == 5
    assert 500 < report.valid_rows < 2_000  # the readable part of the truncated file
    assert report.rejects_by_reason["truncated_file"] >= 1
    assert report.rejects_by_reason["line_too_long"] == 1
    assert report.rejects_by_reason["not_utf8"] == 1
    assert report.rejects_by_reason["wrong_type"] == 1  # c2's time
    assert report.rejects_by_reason["unparseable"] == 1  # c3's short row
    ids = set(read_events(storage)["event_id"].to_pylist())
    assert {"e2", "c1"} <= ids and "e3" not in ids
    csv_row = read_events(storage).filter(pc.equal(read_events(storage)["event_id"], "c1"))
    assert csv_row["country"].to_pylist() == ["SE"] and csv_row["ms_played"].to_pylist() == [500]


def test_gzip_bombs_are_rejects_and_the_load_goes_on(storage, load):
    """A gigabyte line and half a gigabyte of newlines, each in ~1 MB of gzip, among good
    files: each bomb ends with a reject of its own reason, the good rows all load."""
    from tests.etl.gzip_bombs import gz_repeat

    files, expected = raw_files("acme", events=3_000, files=2, defect_share=0)
    _put(storage, files)
    storage.put_bytes("raw/line.jsonl.gz", gz_repeat(b"x" * (1 << 20), 1024))
    storage.put_bytes("raw/newlines.jsonl.gz", gz_repeat(b"\n" * (1 << 20), 512))
    report = load(storage, "acme")
    assert report.files == 4 and report.loaded_rows == expected["valid"] == 3_000
    assert report.rejects_by_reason == {"line_too_long": 1, "ratio_too_high": 2}
    assert report.lines == 3_000 + 3
    quarantined = {
        key: [json.loads(line)["reason"] for line in storage.get_text(key).splitlines()]
        for key in storage.list_keys("quarantine")
    }
    assert quarantined == {
        "quarantine/events/line.jsonl.gz.rejects.jsonl": ["line_too_long", "ratio_too_high"],
        "quarantine/events/newlines.jsonl.gz.rejects.jsonl": ["ratio_too_high"],
    }


def test_too_many_bad_rows_loads_nothing(storage, load):
    files, _ = raw_files("acme", events=2_000, files=1, defect_share=0.5)
    _put(storage, files)
    with pytest.raises(TooManyBadRows, match="nothing was loaded"):
        load(storage, "acme", max_bad_share=0.1)
    assert not storage.exists(MANIFEST_KEY)
    assert storage.list_keys("quarantine")  # the evidence is kept
    report = load(storage, "acme", max_bad_share=0.9)  # an operator raises it
    assert report.files == 1 and report.loaded_rows > 0


def _read_all(data: bytes, source: str, batch_rows: int):
    import io
    from datetime import UTC, datetime

    from setlist.etl.raw_events import BatchValidator, read_batches

    validator = BatchValidator("acme", datetime(2026, 11, 20, tzinfo=UTC))
    batches = list(read_batches(io.BytesIO(data), source, validator, batch_rows))
    rows = [r for b in batches for r in b.table.to_pylist()]
    rejects = [r.as_json() for b in batches for r in b.rejects]
    return rows, rejects, sum(b.lines for b in batches)


def test_one_pass_read_and_per_column_read_agree(monkeypatch):
    """Odd values, blank and odd lines: the same rows and rejects whatever the batch size
    and whether the batch takes the one-pass read or the per-column one."""
    from setlist.etl import raw_events

    good = (
        b'{"event_id":"e%d","tenant_id":"acme","user_id":"u","track_id":"t","artist_id":"a",'
        b'"ts":"2026-11-02T10:00:00+00:00","ms_played":1000,"context":" Album ","country":"se"}'
    )
    base = {"user_id": "u", "track_id": "t", "artist_id": "a", "ts": "2026-11-02T10:00:00Z"}

    def ev(event_id: str, **values) -> bytes:
        return json.dumps({"event_id": event_id, **base, "ms_played": 1, **values}).encode()

    odd = [
        ev("x1", user_id=5),
        ev("x2", ms_played=True),
        ev("x3", ms_played=1.0),
        ev("x4", ts=1762077600000, ms_played=" 12 "),
        ev("x5", ts="2026-11-02T10:00:00", ms_played=""),
        ev("x6", user_id="", ts="", ms_played=None),
        ev("x7", track_id={"a": 1}, ts="nope"),
        ev("x9", ms_played="--5"),
        ev("x10", ms_played="\u00b2"),
        ev("x11", ms_played=2**70),
        ev("x12", ms_played=str(2**70)),
        b"",
        b"   ",
        b"[1,2]",
        b"null",
        b"{bad",
        b'{"event_id":"\xff"}',
        b'{"event_id":"d",' + ev("x8")[1:] + b"\r",
    ]
    lines = [good % i for i in range(40)]
    for i, line in enumerate(odd):
        lines.insert(3 * i + 1, line)
    data = b"\n".join(lines)
    expected = _read_all(data, "raw/x.jsonl", 1_000)
    assert expected[2] == len(lines) - 2  # the two blank lines are no input lines
    # Integers that only look like ones, or don't fit int64, are rejected, not a crash.
    rejects = [json.loads(r) for r in expected[1]]
    for event_id in ("x9", "x10", "x11", "x12"):
        (hit,) = [r for r in rejects if f'"event_id": "{event_id}"' in r["raw"]]
        assert hit["reason"] == "wrong_type", hit
        assert event_id not in {row["event_id"] for row in expected[0]}
    for batch_rows in (1, 3, 7, 1_000):
        assert _read_all(data, "raw/x.jsonl", batch_rows) == expected
    monkeypatch.setattr(raw_events, "_text_columns", lambda records: None)
    for batch_rows in (1, 5, 1_000):
        assert _read_all(data, "raw/x.jsonl", batch_rows) == expected


async def test_the_flow_stages_files_in_workers_as_its_own_tasks(client, tenant_id):
    """In a flow run, files staged side by side are still task runs of that flow run."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.etl import data_etl
    from setlist.core.storage import load_storage_config
    from setlist.tenants.onboarding import TenantSpec, create_tenant

    await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    storage = tenant_storage(tenant_id, await load_storage_config("setlist-storage"))
    files, expected = raw_files(tenant_id, events=3_000, files=3, defect_share=0.02)
    _put(storage, files)
    state = await data_etl(tenant_id=tenant_id, workers=2, return_state=True)
    report = await state.result()
    assert report.files == 3 and report.loaded_rows == expected["valid"]
    runs = await client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    )
    names = sorted(r.name.rsplit("-", 1)[0] for r in runs if r.state and r.state.is_completed())
    assert names.count("stage_file") == 3 and names.count("merge_partition") >= 1


def test_id_and_integer_checks_match_their_definitions():
    """The byte-level id check says what the regex says, on sliced arrays and nulls too;
    ms_played takes ints and digit strings within int64, flags anything else."""
    import re

    import numpy as np
    import pyarrow as pa

    from setlist.etl.raw_events import _ints, _not_id

    values = ["", " ", "a b", "abc", "é", None, "x" * 128, "x" * 129, "\x7f", "~!", "a\tb"]
    values += ["\x00", "ok-1", "\u2028", "A" * 127 + "é", "A" * 127 + "~", "!"]
    ids = re.compile(r"[\x21-\x7e]{1,128}")
    for start in range(4):
        array = pa.array(values * 3, pa.string()).slice(start)
        expected = [v is not None and not ids.fullmatch(v) for v in array.to_pylist()]
        assert _not_id(array).tolist() == expected
    assert _not_id(pa.array([], pa.string())).tolist() == []
    assert _not_id(pa.array([None, ""], pa.string())).tolist() == [False, True]

    def reference(v):  # (int64 or None, flagged): the rule, one value at a time
        if v is None or v == "":
            return None, False
        if type(v) is str and v.strip().lstrip("-").isdigit():
            try:
                v = int(v)
            except ValueError:
                return None, True
        if type(v) is int and -(2**63) <= v < 2**63:
            return v, False
        return None, True

    odd = [" 7 ", "--5", "\u00b2", "-", "12", 2**63, -(2**63) - 1, 5.0, True, "a while", [1]]
    ints = [0, -1, 5, None, 2**63 - 1, -(2**63)]
    for values in (ints, ints + [""], ints + odd, odd + ints, odd, [2**63, *ints]):
        array, bad = _ints(values)
        wanted = [reference(v) for v in values]
        assert array.to_pylist() == [n for n, _ in wanted]
        flagged = [f for _, f in wanted]
        assert (bad is None and not any(flagged)) or np.asarray(bad).tolist() == flagged


def test_a_staging_worker_imports_neither_prefect_nor_pandas(tmp_path):
    """A worker process opens a local store from its root (no Prefect block), keeps
    pyarrow from importing pandas, and needs neither httpx nor pydantic (the tenant-id
    rules and the retry helper do without them): it starts in a fraction of the time,
    and a load's first worker stages beside the load's own process from the start."""
    import subprocess
    import sys

    storage = tenant_storage("acme", _local_config(tmp_path))
    files, expected = raw_files("acme", events=500, files=1, defect_share=0.05)
    _put(storage, files)
    (key,) = files
    script = f"""
import sys
from datetime import UTC, datetime
from pathlib import Path
from setlist.etl.curated import StageArgs, stage_raw_file_in_worker
from setlist.etl.raw_events import BatchValidator
(Path({str(tmp_path)!r}) / "staging").mkdir()
staged = stage_raw_file_in_worker(
    {str(tmp_path)!r}, "acme", StageArgs(
        {key!r}, 1, 0, Path({str(tmp_path)!r}) / "staging",
        BatchValidator("acme", datetime.now(UTC)), 100,
    ),
)
heavy = ("prefect", "pandas", "httpx", "pydantic")
print(staged.lines, staged.valid, *(name in sys.modules for name in heavy))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0] == "500" and out[2:] == ["False"] * 4


def _local_config(root):
    from blocks.storage import LocalStorageConfig

    return LocalStorageConfig(root=str(root))


@pytest.fixture
def tiny_scratch(tmp_path):
    """A real filesystem too small for a load's staging: a 64 KiB tmpfs."""
    import subprocess

    path = tmp_path / "scratch"
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield path
    subprocess.run(["umount", str(path)], check=False)


def test_a_full_scratch_disk_fails_the_load_with_its_reason_and_publishes_nothing(
    storage, load, tiny_scratch, tmp_path
):
    from setlist.etl.load import ScratchFull

    first, _ = raw_files("acme", events=500, files=1, prefix="raw/a")
    _put(storage, first)
    load(storage, "acme", scratch=str(tmp_path / "roomy"))
    before = _curated(storage)
    manifest = read_manifest(storage)
    more, expected = raw_files("acme", events=6_000, files=2, seed=9, prefix="raw/b")
    _put(storage, more)
    with pytest.raises(ScratchFull, match=r"scratch disk full at .*no space left"):
        load(storage, "acme", scratch=str(tiny_scratch), workers=2)
    assert _curated(storage) == before  # the published table, byte for byte
    assert read_manifest(storage) == manifest
    report = load(storage, "acme", scratch=str(tmp_path / "roomy"))  # room again
    assert report.files == 2 and report.loaded_rows == expected["valid"]
    assert report.table_rows == manifest.rows + expected["valid"]
