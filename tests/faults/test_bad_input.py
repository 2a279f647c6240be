"""Bad input, table-driven: every verb with wrong types, out-of-range values, missing or unreadable
paths, text too short to calibrate on, a model modelpress cannot walk, weights with NaN. Each must
exit with status 2 and one line that starts with "error:" and names what to fix — no traceback —
and must leave what was already at its output untouched."""
import json

import pytest
import torch
from typer.testing import CliRunner

from modelpress.cli.main import app
from tests.conftest import byte_tokenizer, tiny_model

runner = CliRunner(env={"COLUMNS": "200"})


def make_files(d):
    """The models, texts and earlier output the table's commands point at, in folder `d`."""
    tiny_model("llama").save_pretrained(d / "tiny")
    byte_tokenizer().save_pretrained(d / "tiny")
    (d / "text.txt").write_text(("The quick brown fox jumps over the lazy dog. " * 80 + "\n") * 6)
    (d / "short.txt").write_text("too short")
    (d / "empty.txt").write_text("")
    (d / "file").write_text("not a folder")
    (d / "plan.json").write_text("{\"format\": \"modelpress-plan\", \"kind\": \"quant\"")
    import transformers as tf

    bert = tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=256)
    tf.BertModel(bert).save_pretrained(d / "bert")
    nan = tiny_model("llama")
    with torch.no_grad():
        nan.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    nan.save_pretrained(d / "nan")
    byte_tokenizer().save_pretrained(d / "nan")
    huge = tiny_model("llama")  # finite weights whose activations overflow float32 when squared
    with torch.no_grad():
        huge.model.layers[0].mlp.up_proj.weight.mul_(1e30)
    huge.save_pretrained(d / "huge")
    byte_tokenizer().save_pretrained(d / "huge")
    out = d / "previous"  # an earlier result a failed command must leave as it is
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    return d


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("bad"))


SMALL = ["--data", "{d}/text.txt", "--eval-suite", "{d}/text.txt", "--n-samples", "4", "--seq-len", "64",
         "--n-eval", "3"]

CASES = [
    # wrong types and unknown names
    (["compress", "{d}/tiny", "--bits", "x"], "--bits"),
    (["compress", "{d}/tiny", "--target-bits", "three"], "--target-bits"),
    (["compress", "{d}/tiny", "--no-such-option"], "--no-such-option"),
    (["compres", "{d}/tiny"], "No such command"),
    (["compress"], "Missing argument"),
    (["bitstack", "{d}/tiny"], "--out"),
    (["search", "{d}/tiny", "--target-bits", "3", "--tokens", "a,b", *SMALL], "comma-separated"),
    (["search", "{d}/tiny", "--target-bits", "3", "--allocator", "nope", *SMALL], "allocator"),
    (["search", "{d}/tiny", "--target-bits", "3", "--kind", "nope", *SMALL], "kind"),
    (["compress", "{d}/tiny", "--method", "nope"], "unknown operator"),
    (["kv", "eval", "{d}/tiny", "--method", "nope"], "nope"),
    (["eval", "{d}/tiny", "--eval-suite", "no-such-suite"], "no-such-suite"),
    # out of range
    (["compress", "{d}/tiny", "--bits", "11"], "bits must be"),
    (["compress", "{d}/tiny", "--bits", "0"], "bits must be"),
    (["compress", "{d}/tiny", "--sparsity", "1.5"], "sparsity must be"),
    (["compress", "{d}/tiny", "--group-size", "-8", "--method", "rtn", "--bits", "4"], "group"),
    (["compress", "{d}/tiny", "--target-bits", "0.5", *SMALL], "bits"),
    (["compress", "{d}/tiny", "--target-bits", "40", *SMALL], "bits"),
    (["compress", "{d}/tiny", "--target-mb", "-1", *SMALL], "MB"),
    (["compress", "{d}/tiny", "--target-sparsity", "1.5", *SMALL], "sparsity"),
    (["compress", "{d}/tiny", "--method", "rtn", "--n-samples", "0", "--data", "{d}/text.txt"], "n_samples"),
    (["compress", "{d}/tiny", "--method", "rtn", "--seq-len", "0", "--data", "{d}/text.txt"], "seq_len"),
    (["search", "{d}/tiny", "--target-bits", "3", "--generations", "-1", *SMALL], "generations"),
    (["search", "{d}/tiny", "--target-bits", "3", "--offspring", "0", *SMALL], "offspring"),
    (["eval", "{d}/tiny", "--n-eval", "0", "--eval-suite", "{d}/text.txt"], "n_eval"),
    (["load", "{d}/tiny", "--max-mb", "-1"], "not a modelpress checkpoint"),
    (["compress", "{d}/tiny", "--compute-dtype", "int8"], "unknown compute dtype"),
    # missing or unreadable paths
    (["compress", "{d}/no-such-folder"], "unknown model"),
    (["info", "{d}/no-such-checkpoint"], "not a directory"),
    (["info", "{d}/file"], "not a directory"),
    (["load", "{d}/no-such-checkpoint"], "not a directory"),
    (["eval", "{d}/missing.gguf"], "GGUF file not found"),
    (["export", "gguf", "{d}/no-such-checkpoint", "--out", "{d}/previous/x.gguf"], "no-such-checkpoint"),
    (["export", "compressed-tensors", "{d}/no-such-checkpoint", "--out", "{d}/previous"], "no-such-checkpoint"),
    (["search", "{d}/tiny", "--target-bits", "3", "--plan", "{d}/no-plan.json", *SMALL], "plan"),
    (["search", "{d}/tiny", "--target-bits", "3", "--plan", "{d}/plan.json", *SMALL], "plan"),
    (["compress", "{d}/tiny", "--method", "rtn", "--data", "{d}/no-such-text.txt"], "corpus"),
    # text too short or empty
    (["compress", "{d}/tiny", "--method", "gptq", "--data", "{d}/empty.txt", "--no-eval"], "empty.txt"),
    (["compress", "{d}/tiny", "--method", "gptq", "--data", "{d}/short.txt", "--no-eval"], "short.txt"),
    (["eval", "{d}/tiny", "--eval-suite", "{d}/short.txt"], "short.txt"),
    # a model modelpress cannot compress
    (["compress", "{d}/bert", "--method", "rtn"], "causal"),
    (["compress", "{d}/nan", "--method", "rtn", *SMALL], "NaN"),
    (["compress", "{d}/huge", "--method", "gptq", "--data", "{d}/text.txt", "--no-eval", "--n-samples", "4",
      "--seq-len", "64"], "NaN or Inf"),
]


def check(files, args, msg) -> str | None:
    """Run one bad command; what is wrong with how it failed, or None."""
    before = {p.name: p.read_bytes() for p in (files / "previous").iterdir()}
    args = [a.format(d=files) for a in args]
    if args[0] in ("compress", "search") and "--out" not in args:
        args += ["--out", str(files / "previous")]
    r = runner.invoke(app, args)
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    if r.exit_code != 2:
        return f"exit status {r.exit_code}: {r.output[-500:]}"
    if "Traceback" in r.output:
        return f"a traceback: {r.output[-500:]}"
    if not lines or not lines[-1].startswith("error:") or sum(ln.startswith("error:") for ln in lines) != 1:
        return f"not one error line: {r.output[-500:]}"
    if msg.lower() not in lines[-1].lower():
        return f"the error does not name {msg!r}: {lines[-1]}"
    if {p.name: p.read_bytes() for p in (files / "previous").iterdir()} != before:
        return "the earlier output was changed"
    if [p for p in files.rglob(".*") if ".tmp-" in p.name]:
        return "a temporary file was left behind"
    return None


@pytest.mark.parametrize("args,msg", CASES, ids=[" ".join(a[:4]).replace("{d}/", "") for a, _ in CASES])
def test_bad_input_one_line_nothing_written(files, args, msg):
    problem = check(files, args, msg)
    assert problem is None, problem


def test_table_covers_every_verb():
    verbs = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    covered = {args[0] for args, _ in CASES}
    assert verbs <= covered, verbs - covered
    json.dumps(CASES)  # the table is plain data: bench/reliability.py counts it


def _commands():
    """(command words, callback) of every verb, sub-verbs included."""
    for c in app.registered_commands:
        yield [c.name], c.callback
    for g in app.registered_groups:
        for c in g.typer_instance.registered_commands:
            yield [g.name, c.name], c.callback


def numeric_option_cases() -> list[list[str]]:
    """Every option that takes a number, on every verb, given a word: click refuses it while parsing,
    before any work, and modelpress must say so in one line that names the option."""
    import inspect
    import typing

    import typer.models

    cases = []
    for words, fn in _commands():
        hints = typing.get_type_hints(fn)
        fixed, numeric = [], []
        for name, p in inspect.signature(fn).parameters.items():
            info, kind = p.default, typing.get_args(hints[name]) or (hints[name],)
            if isinstance(info, typer.models.ArgumentInfo):
                fixed.insert(0, "x")  # positional arguments go first
            elif isinstance(info, typer.models.OptionInfo):
                decl = next(d for d in info.param_decls if d.startswith("--"))
                if info.default is ...:  # a required option
                    fixed += [decl, "x"]
                if set(kind) & {int, float}:
                    numeric.append(decl)
        cases += [[*words, *fixed, decl, "x"] for decl in numeric]
    return cases


NUMERIC = numeric_option_cases()


def test_every_numeric_option_refuses_a_word_in_one_line(files):
    assert len(NUMERIC) > 40
    problems = [p for args in NUMERIC if (p := check(files, args, args[-2]))]
    assert not problems, problems[:5]
