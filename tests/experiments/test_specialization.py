"""Base specialization as a number: I(domain; expert), ESFT concentration and DGES-mask overlap
on synthetic routing statistics with known answers, and `desmoe specialization` on a tiny trained checkpoint."""
import json
import math
import os
import sys

import pytest
import torch

from desmoe.cli import main
from desmoe.experiments.specialization import (concentration, mask_jaccard, metrics_from_stats,
                                               mutual_information, specialization)
from desmoe.integrations.hf import routers as get_routers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "train"))
from test_train import tiny_cfg  # noqa: E402


def _specialised(M=3, E=8, L=2, n=(10, 30, 60)):
    """Domain d routes only to experts {2d, 2d+1} (disjoint), with n[d] picks."""
    c = torch.zeros(L, M, E, dtype=torch.int64)
    for d in range(M):
        c[:, d, 2 * d] = n[d] // 2
        c[:, d, 2 * d + 1] = n[d] - n[d] // 2
    return c


def test_perfectly_specialised_routing_gives_mi_equal_to_domain_entropy_and_disjoint_masks():
    c = _specialised()
    I, H = mutual_information(c)
    p = torch.tensor([10, 30, 60], dtype=torch.float64) / 100
    h = float(-(p * p.log2()).sum())
    assert torch.allclose(H, torch.full_like(H, h)) and torch.allclose(I, H)
    jac, masks = mask_jaccard(c, 0.6)
    assert torch.equal(jac, torch.zeros(2, dtype=jac.dtype))
    assert masks.sum(-1).tolist() == [[2, 2, 2], [2, 2, 2]]
    res = metrics_from_stats(c, c.float())
    assert res["mean"]["mi_norm"] == pytest.approx(1.0) and res["mean"]["mask_jaccard"] == 0.0
    assert res["n_top"] == 2 and res["mean"]["concentration"] == pytest.approx(1.0)  # 2 experts hold all mass


def test_identical_routing_across_domains_gives_zero_mi_and_identical_masks():
    row = torch.tensor([5, 9, 1, 0, 7, 3, 2, 8])
    c = row.expand(2, 4, 8).clone() * torch.tensor([1, 2, 3, 4]).view(1, 4, 1)  # same shares, unequal sizes
    I, H = mutual_information(c)
    assert torch.allclose(I, torch.zeros_like(I), atol=1e-12) and (H > 0).all()
    jac, _ = mask_jaccard(c, 0.6)
    assert torch.allclose(jac, torch.ones_like(jac))
    assert metrics_from_stats(c, c.float())["mean"]["mi_norm"] == pytest.approx(0.0, abs=1e-12)


def test_mi_matches_the_entropy_identity_on_random_counts():
    g = torch.Generator().manual_seed(0)
    c = torch.randint(0, 50, (3, 4, 16), generator=g)
    I, H = mutual_information(c)

    def ent(p):
        p = p[p > 0]
        return float(-(p * p.log2()).sum())

    for l in range(3):
        p = c[l].double() / c[l].sum()
        assert float(I[l]) == pytest.approx(ent(p.sum(1)) + ent(p.sum(0)) - ent(p.reshape(-1)), abs=1e-10)
        assert 0.0 <= float(I[l]) <= float(H[l]) + 1e-12


def test_concentration_bounds():
    E = 10  # n_top = ceil(0.2 * 10) = 2
    uniform = torch.ones(1, 3, E)
    conc, n_top = concentration(uniform, 0.2)
    assert n_top == 2 and float(conc) == pytest.approx(2 / E)
    one_hot = torch.zeros(1, 3, E)
    one_hot[0, torch.arange(3), torch.tensor([0, 4, 9])] = 2.5
    assert float(concentration(one_hot, 0.2)[0]) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(1)
    rnd = torch.rand(4, 5, E, generator=g)
    conc, _ = concentration(rnd, 0.2)
    assert ((conc >= 2 / E - 1e-12) & (conc <= 1 + 1e-12)).all()
    # a domain with no tokens does not drag the mean down
    rnd[:, 0] = 0
    assert ((concentration(rnd, 0.2)[0] >= 2 / E - 1e-12)).all()
    assert concentration(torch.ones(1, 1, 7), 0.2)[1] == 2  # ceil(1.4)
    with pytest.raises(ValueError, match="top_p"):
        concentration(uniform, 0.0)


def test_one_domain_has_no_overlap_and_no_normalised_mi():
    res = metrics_from_stats(torch.ones(2, 1, 4, dtype=torch.int64), torch.ones(2, 1, 4))
    assert res["mean"]["mask_jaccard"] is None and res["mean"]["mi_norm"] is None and res["mean"]["mi_bits"] == 0.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from desmoe.train import config_from_dict
    from desmoe.train.trainer import run

    root = tmp_path_factory.mktemp("spec")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(config_from_dict(tiny_cfg(str(root), max_steps=6, lr=3e-2)), str(root / "run"))
    finally:
        torch.set_num_threads(n)
    return root / "run"


def test_cli_on_a_tiny_checkpoint(trained, tmp_path, capsys, one_thread):
    out = tmp_path / "spec.json"
    assert main(["specialization", "--checkpoint", str(trained), "--tokens", "200", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "I(d;e)" in text and "mean" in text
    res = json.loads(out.read_text())
    assert res["domains"] == ["alpha", "beta", "gamma"] and res["split"] == "test"
    assert all(0 < t <= 200 for t in res["tokens"].values())
    assert len(res["layers"]) == 2
    for r in res["layers"]:
        assert 0.0 <= r["mi_bits"] <= r["h_domain_bits"] + 1e-9 and 0.0 <= r["mi_norm"] <= 1.0
        assert res["concentration_uniform"] - 1e-9 <= r["concentration"] <= 1.0 + 1e-9
        assert 0.0 <= r["mask_jaccard"] <= 1.0 and all(1 <= s <= res["num_experts"] for s in r["mask_sizes"])
    for k in ("mi_bits", "mi_norm", "concentration", "mask_jaccard"):
        assert res["mean"][k] == pytest.approx(sum(r[k] for r in res["layers"]) / 2)
    assert res["phi"] == 0.6 and res["n_top"] == math.ceil(0.2 * res["num_experts"])


def test_specialization_restores_the_routers_recording_state(trained, one_thread):
    import desmoe

    model, _ = desmoe.from_pretrained(str(trained), backend="reference")
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    batches = {"a": [{"input_ids": ids}], "b": [{"input_ids": ids.flip(0)}]}
    assert specialization(model, batches, max_tokens=20)["tokens"] == {"a": 20, "b": 20}
    res = specialization(model, batches)
    assert res["tokens"] == {"a": 32, "b": 32}
    # the same tokens in both domains: only their order differs, so the routing is identical
    assert res["mean"]["mi_bits"] == pytest.approx(0.0, abs=1e-9) and res["mean"]["mask_jaccard"] == 1.0
    from desmoe.context import recorder

    assert all(recorder(r) is None for r in get_routers(model))


def test_cli_errors_name_the_argument(trained, tmp_path, capsys):
    assert main(["specialization", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert main(["specialization", "--checkpoint", str(trained), "--tokens", "0"]) == 2
    assert "--tokens" in capsys.readouterr().err
    assert main(["specialization", "--checkpoint", str(tmp_path)]) == 2  # an empty folder: no run
    assert "error" in capsys.readouterr().err
