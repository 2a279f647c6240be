"""The gguf kind's levels with an importance matrix (llama-quantize --imatrix's quantizer)."""
import pytest

from modelpress.errors import ConfigError
from modelpress.export import llamacpp
from modelpress.search import open_database
from tests.conftest import byte_tokenizer, tiny_model
from tests.export.test_checkpoint import windows


def test_imatrix_and_gptq_levels_have_the_same_bytes_and_lower_output_error(tmp_path):
    if not llamacpp.available():
        pytest.skip("quantizing with an importance matrix needs llama.cpp's library")
    w, m, tok = windows(), tiny_model("llama"), byte_tokenizer()
    types = ("Q4_0", "Q5_1")
    plain = open_database(m, tok, "gguf", data=w, db=tmp_path / "plain", types=types)
    aware = open_database(m, tok, "gguf", data=w, db=tmp_path / "aware", types=types, imatrix=True, gptq=True)
    assert aware.meta["kind"]["settings"]["imatrix"] is True and "imatrix" not in plain.meta["kind"]["settings"]
    layers = [u for u in plain.units if plain.units[u].group not in ("embedding", "output")]
    better = gptq_best = 0
    for u in layers:
        assert sorted(aware.levels_of(u)) == ["Q4_0", "Q4_0+gptq", "Q4_0+imatrix", "Q5_1", "Q5_1+gptq", "Q5_1+imatrix"]
        for t in types:
            p, a, g = (aware.levels_of(u)[t + q] for q in ("", "+imatrix", "+gptq"))
            assert p["nbytes"] == a["nbytes"] == g["nbytes"] and p["error"] == plain.levels_of(u)[t]["error"]
            better += a["error"] < p["error"]
            gptq_best += g["error"] < min(a["error"], p["error"])
    assert better >= 0.8 * 2 * len(layers)  # weighted by the diagonal of XᵀX, judged on all of it
    assert gptq_best >= 0.8 * 2 * len(layers)  # the whole XᵀX, column by column
    for u in set(plain.units) - set(layers):  # the embedding and the untied output head: no matmul input here
        assert sorted(aware.levels_of(u)) == ["Q4_0", "Q5_1"]
    # a search over both quantizers keeps the budget and writes a file llama.cpp's reader takes
    from modelpress.allocate.budget import Budget, make_problem
    from modelpress.export.ggufio import export_gguf
    from modelpress.search import allocate, materialize

    p = make_problem(aware, Budget("mb", 1.0))
    target = (aware.meta["fixed_bytes"] + (p.min_cost() + p.max_cost()) / 2) / 1e6
    res = allocate(m, aware, Budget("mb", target), "evolutionary", data=w, generations=3, offspring=4, tokens=(32, 64))
    assert any(v.endswith("+imatrix") or v.endswith("+gptq") for v in res.plan.levels.values())
    dense = tiny_model("llama")
    units = materialize(m, tok, aware, res.plan).units
    out = export_gguf(m, tmp_path / "s.gguf", weights=units, tokenizer=tok)
    assert out.stat().st_size <= target * 1e6
    # llama.cpp's quantizer, given the recipe written beside the file, rebuilds every tensor of it
    from modelpress.export.ggufio import read_llama_quantize_recipe, write_llama_quantize_recipe
    from tests.export.test_llamacpp import _same_tensors

    recipe = write_llama_quantize_recipe(m, out, units)
    assert "--imatrix" in recipe["command"] and "--tensor-type-file" in recipe["command"]
    types, importance = read_llama_quantize_recipe(out)
    levels = list(res.plan.levels.values())
    assert len(types) == len(units) and len(importance) == sum(v.endswith("+imatrix") for v in levels)
    assert len(recipe["not_rebuilt_exactly"]) == sum(v.endswith("+gptq") for v in levels)
    f32 = export_gguf(dense, tmp_path / "f32.gguf", default_type="F32", tokenizer=tok)
    rebuilt = llamacpp.quantize(f32, tmp_path / "rebuilt.gguf", "Q8_0", imatrix=importance, tensor_types=types)
    assert sorted(_same_tensors(out, rebuilt)) == recipe["not_rebuilt_exactly"]  # all but GPTQ's codes


def test_a_llama_cpp_presets_types_map_to_a_plan_within_its_own_size(tmp_path):
    """The types llama.cpp's quantizer chose for a preset become a plan over the database's levels
    (the best quantizer of each type), which fits the budget of that preset's file size: a search
    can start from it."""
    if not llamacpp.available():
        pytest.skip("needs llama.cpp's library")
    from modelpress.allocate.budget import Budget, make_problem
    from modelpress.export.ggufio import export_gguf
    from modelpress.levels.kinds.gguf import ggml_type, plan_for_types, types_of_file

    w, m, tok = windows(), tiny_model("llama"), byte_tokenizer()
    f32 = export_gguf(m, tmp_path / "f32.gguf", default_type="F32", tokenizer=tok)
    preset = llamacpp.quantize(f32, tmp_path / "p.gguf", "Q4_1")
    types = types_of_file(m, preset)
    db = open_database(m, tok, "gguf", data=w, db=tmp_path / "db", types=("Q4_0", "Q4_1", "Q5_1", "Q8_0"),
                       imatrix=True, gptq=True)
    plan = plan_for_types(db, types)
    kept = 0
    for u, v in plan.levels.items():  # the type's most accurate quantizer, or a level beating all of them
        of_type = [m for x, m in db.levels_of(u).items() if ggml_type(x) == types[u]]
        assert of_type, (u, types[u])
        assert db.level_meta(u, v)["nbytes"] <= of_type[0]["nbytes"]
        assert db.level_meta(u, v)["error"] <= min(m["error"] for m in of_type)
        kept += ggml_type(v) == types[u]
    assert kept >= 0.8 * len(db.units)
    # llama.cpp's file holds other metadata and padding than the budget's allowance for modelpress's
    # header: the plan may be a little over; bringing it within the budget lowers a unit or two
    from modelpress.allocate.problem import trim

    problem = make_problem(db, Budget("mb", preset.stat().st_size / 1e6))
    choice = plan.choice(problem)
    assert problem.cost(choice) <= 1.02 * problem.budget
    fitted = trim(problem, choice)
    assert problem.cost(fitted) <= problem.budget and sum(a != b for a, b in zip(choice, fitted)) <= 2
    with pytest.raises(ConfigError, match="no GGML type given for 1 units"):
        plan_for_types(db, {u: t for u, t in types.items() if u != "lm_head"})
