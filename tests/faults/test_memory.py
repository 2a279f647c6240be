"""Memory ceilings: the peak resident memory of compress, a level database build and a search on a
200 MB random Llama, each in a fresh process, over the process's fixed overhead, stays within its
ceiling (tests/faults/memory.py: compress 2x the float model plus one block's activations for the
calibration windows; database 3x; search 6x, plus the same activations). docs/reliability.md has the figures on smollm2-135m."""
import json
import subprocess
import sys

import pytest

from modelpress.models.synthetic import llama_config, write_random_model
from tests.faults.crash import REPO


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("mem") / "m"
    write_random_model(d, llama_config(200e6, hidden=512, intermediate=1408, heads=8, kv_heads=4, vocab=4096))
    from tests.conftest import byte_tokenizer

    byte_tokenizer().save_pretrained(d)
    return d


@pytest.mark.parametrize("job", ["compress", "database", "search"])
def test_peak_memory_within_ceiling(model_folder, job):
    r = subprocess.run([sys.executable, "-m", "tests.faults.memory", job, str(model_folder), "16", "128"],
                       capture_output=True, text=True, cwd=REPO, timeout=900,
                       env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(model_folder.parent),
                            "MODELPRESS_CACHE": str(model_folder.parent / "cache")})
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert 180e6 < m["model_bytes"] < 220e6
    assert m["peak_over_fixed"] <= m["ceiling_bytes"], m
