"""The gguf kind's levels with an importance matrix (llama-quantize --imatrix's quantizer)."""
import pytest

from modelpress.export import llamacpp
from modelpress.search import open_database
from tests.conftest import byte_tokenizer, tiny_model
from tests.export.test_checkpoint import windows


def test_imatrix_levels_have_the_same_bytes_and_lower_output_error(tmp_path):
    if not llamacpp.available():
        pytest.skip("quantizing with an importance matrix needs llama.cpp's library")
    w, m, tok = windows(), tiny_model("llama"), byte_tokenizer()
    types = ("Q4_0", "Q5_1")
    plain = open_database(m, tok, "gguf", data=w, db=tmp_path / "plain", types=types)
    aware = open_database(m, tok, "gguf", data=w, db=tmp_path / "aware", types=types, imatrix=True)
    assert aware.meta["kind"]["settings"]["imatrix"] is True and "imatrix" not in plain.meta["kind"]["settings"]
    layers = [u for u in plain.units if plain.units[u].group != "embedding"]
    better = 0
    for u in layers:
        for t in types:
            p, a = plain.levels_of(u)[t], aware.levels_of(u)[t]
            assert p["nbytes"] == a["nbytes"]
            better += a["error"] < p["error"]
    assert better >= 0.8 * 2 * len(layers)  # weighted by the diagonal of XᵀX, judged on all of it
    emb = next(u for u in plain.units if plain.units[u].group == "embedding")
    assert plain.levels_of(emb)["Q4_0"]["error"] == aware.levels_of(emb)["Q4_0"]["error"]
