"""SIGKILL at random moments of real jobs (subprocesses on a tiny model): nothing finished is lost
or redone, no half-made file is ever read, and the rerun equals an uninterrupted run bit for bit.
A few seeded kill points per job here; bench/reliability.py runs more."""
import pytest

from tests.faults import crash

KILLS = {"database": 4, "search": 3, "compress": 3, "bitstack": 2, "gguf": 2}


@pytest.mark.parametrize("job", crash.JOBS)
def test_killed_job_resumes_exactly(tmp_path, job):
    res = crash.trials(job, KILLS[job], seed=1, root=tmp_path)
    assert not res["failures"], res["failures"]
    assert res.get("killed", 0) >= 1, res  # at least one kill landed before the job's end
