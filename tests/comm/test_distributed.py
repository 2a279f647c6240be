"""Two gloo processes on the CPU."""
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _launch(fn, *args, world=2):
    mp.spawn(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True)


def _entry(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, *args)
    except BaseException:
        dist.destroy_process_group()
        raise
    from modelpress.comm.train import shutdown

    shutdown()  # a plain destroy_process_group() here aborted 2 of ~75 launches


def _ddp_params(rank, out, hook, hook_kw=None):
    from modelpress.comm import compression_hook
    from modelpress.comm.train import tiny_lm

    model = tiny_lm(32, 2, seed=0)
    net = torch.nn.parallel.DistributedDataParallel(model)
    if hook:
        state, h = compression_hook(net, hook if isinstance(hook, str) else "none", ef="none", **(hook_kw or {}))
        net.register_comm_hook(state, h)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)
    for _ in range(5):
        ids = torch.randint(0, 256, (2, 16), generator=g)
        loss = net(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    if rank == 0:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, out)


def test_noop_hook_matches_plain_ddp_exactly(tmp_path):
    _launch(_ddp_params, str(tmp_path / "plain.pt"), False)
    _launch(_ddp_params, str(tmp_path / "hook.pt"), True)
    a, b = torch.load(tmp_path / "plain.pt"), torch.load(tmp_path / "hook.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bucket_scope_topk_at_full_ratio_is_plain_ddp(tmp_path):
    _launch(_ddp_params, str(tmp_path / "plain.pt"), False)
    _launch(_ddp_params, str(tmp_path / "bucket.pt"), "topk", dict(ratio=1.0, scope="bucket"))
    a, b = torch.load(tmp_path / "plain.pt"), torch.load(tmp_path / "bucket.pt")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_bucket_scope_rejects_lgreco():
    from modelpress.comm import LGreCo, compression_hook
    from modelpress.comm.train import tiny_lm
    from modelpress.errors import ConfigError

    with pytest.raises(ConfigError, match="scope"):
        compression_hook(tiny_lm(32, 1), "topk", scope="bucket", lgreco=LGreCo((0.01, 0.02)))
    with pytest.raises(ConfigError, match="scope"):
        compression_hook(tiny_lm(32, 1), "topk", scope="layer")


def _exchange_all(rank, out):
    from modelpress.comm import COMPRESSORS, exchange

    g = torch.Generator().manual_seed(10 + rank)
    v = torch.randn(64, generator=g)
    m = torch.randn(12, 8, generator=g)
    res = {}
    for name, kw in [("none", {}), ("fp16", {}), ("topk", dict(ratio=0.25)), ("randk", dict(ratio=0.25)),
                     ("qsgd", dict(bits=8)), ("sign", {}), ("powersgd", dict(rank=8))]:
        c = COMPRESSORS.build(name, **kw)
        t = m if name == "powersgd" else v
        avg, loc, sent = exchange([(c, t, {"step": 1, "key": 0})])
        res[name] = (avg[0], loc[0], t, sent)
    torch.save(res, f"{out}.{rank}")


def test_every_compressor_averages_the_workers(tmp_path):
    _launch(_exchange_all, str(tmp_path / "x"))
    r0, r1 = torch.load(f"{tmp_path / 'x'}.0"), torch.load(f"{tmp_path / 'x'}.1")
    for name in r0:
        avg0, loc0, t0, _ = r0[name]
        avg1, loc1, t1, _ = r1[name]
        assert torch.allclose(avg0, avg1, atol=1e-6), name  # every worker gets the same result
        if name == "powersgd":
            assert torch.allclose(avg0, (t0 + t1) / 2, atol=1e-4)  # rank 8 of an 8-column matrix: exact
        else:
            assert torch.allclose(avg0, (loc0 + loc1) / 2, atol=1e-3), name  # the mean of what was sent


def test_hook_state_survives_save_and_load(tmp_path):

    common = ["--compressor", "topk", "--ratio", "0.05", "--ef", "ef21", "--hidden", "32", "--layers", "2",
              "--batch", "2", "--seq", "32"]
    _launch(_train, common + ["--steps", "12", "--out-json", str(tmp_path / "full.json")])
    _launch(_train, common + ["--steps", "6", "--checkpoint", str(tmp_path / "ck.pt")])
    _launch(_train, common + ["--steps", "12", "--resume", str(tmp_path / "ck.pt"), "--out-json", str(tmp_path / "res.json")])
    full = json.loads((tmp_path / "full.json").read_text())
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["loss"] == full["loss"][6:]  # the resumed run continues exactly
    assert res["bytes"] == full["bytes"][6:]


def _train(rank, argv):
    from modelpress.comm.train import main

    main(argv)


def _run(tmp_path, name, common, extra=()):
    _launch(_train, common + list(extra) + ["--out-json", str(tmp_path / f"{name}.json")])
    return json.loads((tmp_path / f"{name}.json").read_text())


def test_topk_ef21_trains_within_5_percent_of_uncompressed(tmp_path):
    # Measured (hidden 64, 2 layers, 400 steps, Adam 1e-3): dense 1.783; Top-K EF21 at 30% 1.826
    # (+2.4%), at 10% 2.109, at 1% 2.748. Top-K 1% does not get within 5% of dense on a model
    # this small in a few hundred steps (see the closing note of the issue); 30% does.
    common = ["--hidden", "64", "--layers", "2", "--batch", "8", "--seq", "64", "--steps", "400", "--lr", "1e-3"]
    dense = _run(tmp_path, "dense", common)
    topk = _run(tmp_path, "topk", common, ["--compressor", "topk", "--ratio", "0.3", "--ef", "ef21"])
    assert topk["final_loss"] < 1.05 * dense["final_loss"], (topk["final_loss"], dense["final_loss"])
    assert topk["total_bytes"] < 0.65 * dense["total_bytes"]


def test_topk_1_percent_error_feedback_beats_plain_topk(tmp_path):
    common = ["--hidden", "64", "--layers", "2", "--batch", "8", "--seq", "64", "--steps", "200", "--lr", "1e-3"]
    plain = _run(tmp_path, "plain", common, ["--compressor", "topk", "--ratio", "0.01"])
    ef21 = _run(tmp_path, "ef21", common, ["--compressor", "topk", "--ratio", "0.01", "--ef", "ef21"])
    assert ef21["final_loss"] < plain["final_loss"] - 0.05, (ef21["final_loss"], plain["final_loss"])
    assert ef21["total_bytes"] < 0.05 * ef21["dense_bytes"]
    assert ef21["loss"][0] - ef21["final_loss"] > 2.0  # it learns: from ~5.5 nats
