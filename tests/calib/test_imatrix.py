import torch

from modelpress.calib.imatrix import importance
from tests.conftest import tiny_model


def test_importance_is_the_mean_square_of_each_layers_dense_inputs(float32_forwards):
    m = tiny_model("llama")
    ids = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(0))
    seen = {}
    hooks = [mod.register_forward_hook(lambda mod, x, y, n=n: seen.setdefault(n, []).append(x[0].reshape(-1, x[0].shape[-1])))
             for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and n != "lm_head"]
    with torch.no_grad():
        m(ids)
    for h in hooks:
        h.remove()
    im = importance(m, ids, batch_size=2)
    assert set(im) == set(seen) and len(im) == 3 * 7
    for n, xs in seen.items():
        x = torch.cat(xs).float()
        torch.testing.assert_close(im[n], (x * x).mean(0), rtol=1e-4, atol=1e-6)
