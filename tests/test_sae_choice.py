"""Feature Choice / Mutual Choice SAEs (docs/algorithms.md, "Feature and mutual choice"): mutual choice =
BatchTopK, feature choice column budgets (equal or Zipf), per-latent / global inference thresholds, aux_zipf,
planted recovery."""

import pytest
import torch
from helpers import fit_toy

from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.kernels import SparseCode
from saelab.sae import io as sae_io
from saelab.sae.base import EncoderPass, StepContext
from saelab.sae.batchtopk import BatchTopKSAE
from saelab.sae.choice import ChoiceConfig, ChoiceSAE, feature_choice_layout, zipf_capacities, zipf_weights
from saelab.sae.topk import AuxConfig, TopKConfig
from saelab.synthetic import mmcs


def make(mode="mutual", d_in=32, d_sae=192, k=4, seed=1, aux=None, topk=None, **choice):
    torch.manual_seed(seed)
    cfg = SAEConfig(architecture="choice", d_sae=d_sae, k=k, input_norm="none")
    options = {
        "aux": aux or AuxConfig(),
        "topk": topk or TopKConfig(),
        "choice": ChoiceConfig(choice_mode=mode, **choice),
    }
    return ChoiceSAE(d_in, cfg, options)


# -- mutual choice ----------------------------------------------------------------------------------
def test_mutual_choice_equals_batchtopk():
    choice = make("mutual")
    torch.manual_seed(1)
    btk = BatchTopKSAE(32, SAEConfig(architecture="batchtopk", d_sae=192, k=4, input_norm="none"))
    with torch.no_grad():
        choice.W_dec.mul_(torch.rand(192, 1) + 0.5)  # non-unit norms: the rescaled scores must agree too
    btk.load_state_dict({k: v for k, v in choice.state_dict().items() if k in btk.state_dict()})
    x = torch.randn(64, 32)
    z = choice.encode_pre(x)
    a_choice, a_btk = choice.activate(z, StepContext()), btk.activate(z, StepContext())
    assert torch.equal(a_choice, a_btk)
    assert int((a_choice != 0).sum()) == 4 * 64
    choice.update_inference_state(SparseCode.from_dense(a_choice))
    btk.update_inference_state(SparseCode.from_dense(a_btk))
    assert choice.threshold.shape == () and torch.equal(choice.threshold, btk.threshold)
    assert torch.equal(choice.encode(x), btk.encode(x))


def test_mutual_choice_row_l0_varies_with_mean_k():
    sae = make("mutual")
    a = sae.activate(sae.encode_pre(torch.randn(128, 32)), StepContext())
    per_row = (a != 0).sum(dim=1).float()
    assert per_row.mean() == 4 and per_row.std() > 0


# -- feature choice ---------------------------------------------------------------------------------
def test_feature_choice_column_budgets():
    sae = make("feature", d_sae=32, k=4)
    batch = 96  # m = k * B / n = 12 tokens per latent
    z = torch.randn(batch, 32)
    a = sae.activate(z, StepContext())
    per_col = (a != 0).sum(dim=0)
    assert (per_col <= 12).all()
    assert int(per_col.sum()) <= 4 * batch
    assert (a >= 0).all()
    # each column keeps its own top-m positive pre-activations (affinities ReLU(z) * ||d_i|| = ReLU(z) here)
    top = z.topk(12, dim=0).values
    for i in range(32):
        kept = a[:, i][a[:, i] != 0].sort(descending=True).values
        assert torch.equal(kept, top[:, i][top[:, i] > 0])
    per_row = (a != 0).sum(dim=1).float()
    assert per_row.std() > 0  # the number of latents per token varies


def test_feature_choice_mean_row_l0_is_k_when_affinities_are_positive():
    sae = make("feature", d_sae=32, k=4)
    z = torch.rand(96, 32) + 0.1  # all positive: every slot of every budget is filled
    a = sae.activate(z, StepContext())
    assert ((a != 0).sum(dim=0) == 12).all()
    assert (a != 0).sum(dim=1).float().mean() == 4


def test_feature_choice_layout_fills_each_column_budget_with_its_best_tokens():
    scores = torch.rand(10, 3)
    kept = feature_choice_layout(scores, torch.tensor([2, 0, 5])).to_dense(torch.ones(7)).bool()
    assert kept.sum(dim=0).tolist() == [2, 0, 5]
    assert torch.equal(kept[:, 0], scores[:, 0] >= scores[:, 0].topk(2).values[-1])
    assert torch.equal(kept[:, 2], scores[:, 2] >= scores[:, 2].topk(5).values[-1])


def test_zipf_capacities():
    equal = zipf_capacities(192, 4 * 512, 0.0, 1.0, cap=512)
    assert int(equal.sum()) == 2048 and int(equal.max() - equal.min()) <= 1  # 2048 / 192 = 10.67
    zipf = zipf_capacities(192, 2048, 1.0, 1.0, cap=512)
    assert int(zipf.sum()) == 2048
    assert (zipf[:-1] >= zipf[1:]).all() and zipf[0] > 10 * zipf[-1]
    weights = zipf_weights(5, 2.0, 0.5)
    assert torch.allclose(
        weights,
        (torch.arange(1, 6, dtype=torch.float64) + 0.5) ** -2
        / weights.new_tensor([(r + 0.5) ** -2 for r in range(1, 6)]).sum(),
    )
    capped = zipf_capacities(4, 40, 3.0, 0.0, cap=10)
    assert (capped <= 10).all() and int(capped.sum()) <= 40


def test_zipf_capacities_follow_the_frequency_ranking():
    sae = make("feature", d_sae=32, k=4, zipf_alpha=1.0)
    freq = torch.rand(32)
    sae.feature_freq.copy_(freq)
    sae.freq_updates.fill_(1)
    caps = sae.capacities(96)
    assert int(caps.sum()) == 4 * 96
    order = freq.argsort(descending=True)
    assert (caps[order][:-1] >= caps[order][1:]).all()  # the most used latent gets the largest budget
    a = sae.activate(torch.randn(96, 32), StepContext())
    assert ((a != 0).sum(dim=0) <= caps).all()


def test_feature_thresholds_are_per_latent_running_minima():
    sae = make("feature", d_sae=3, k=1, topk=TopKConfig(threshold_rate=0.5))
    assert sae.threshold.shape == (3,)
    a1 = torch.tensor([[0.5, 0.0, 0.0], [2.0, 0.0, 0.7]])
    sae.update_inference_state(SparseCode.from_dense(a1))
    assert sae.threshold[0] == 0.5 and sae.threshold[2] == pytest.approx(0.7)
    assert sae.threshold[1] == float("inf")  # never kept: never fires at inference
    a2 = torch.tensor([[1.5, 0.4, 0.0]])
    sae.update_inference_state(SparseCode.from_dense(a2))
    assert torch.allclose(sae.threshold, torch.tensor([1.0, 0.4, 0.7]))
    z = torch.tensor([[0.9, 0.5, 0.8], [1.2, 0.3, 0.6]])
    assert torch.equal(sae.activate(z), torch.tensor([[0.0, 0.5, 0.8], [1.2, 0.0, 0.0]]))


def test_feature_thresholds_take_bf16_codes_as_training_under_autocast_gives_them():
    """--precision bf16: the training code's values are bfloat16; the float32 running minima take them exactly."""
    sae = make("feature", d_sae=3, k=1, topk=TopKConfig(threshold_rate=0.5))
    a = torch.tensor([[0.5, 0.0, 0.0], [2.0, 0.0, 0.75]], dtype=torch.bfloat16)
    sae.update_inference_state(SparseCode.from_dense(a))
    assert sae.threshold.dtype == torch.float32
    assert sae.threshold.tolist() == [0.5, float("inf"), 0.75]


def test_running_frequency():
    sae = make("mutual", d_sae=3, k=1, topk=TopKConfig(threshold_rate=0.5))
    a1 = torch.tensor([[1.0, 0.0, 0.0], [1.0, 2.0, 0.0]])
    sae.update_inference_state(SparseCode.from_dense(a1))
    assert sae.feature_freq.tolist() == [1.0, 0.5, 0.0] and int(sae.freq_updates) == 1
    a2 = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    sae.update_inference_state(SparseCode.from_dense(a2))
    assert sae.feature_freq.tolist() == [0.5, 0.75, 0.0]


# -- aux_zipf -----------------------------------------------------------------------------------------
def test_aux_zipf_targets_and_underused_latents():
    sae = make("mutual", d_sae=4, k=2, zipf_alpha=1.0, zipf_beta=0.0)
    assert not sae.underused(None).any()  # nothing tracked yet
    sae.feature_freq.copy_(torch.tensor([0.1, 1.2, 0.0, 0.5]))
    sae.freq_updates.fill_(1)
    # ranks by frequency: latent 1, 3, 0, 2; targets 2 * (1, 1/2, 1/3, 1/4) / (25/12) = .96, .48, .32, .24
    by_rank = 2 * torch.tensor([1, 1 / 2, 1 / 3, 1 / 4], dtype=torch.float64) / (25 / 12)
    expected = torch.tensor([by_rank[2], by_rank[0], by_rank[3], by_rank[1]]).float()
    assert torch.allclose(sae.zipf_targets(), expected)
    assert float(sae.zipf_targets().sum()) == pytest.approx(2.0)
    assert sae.underused(None).tolist() == [True, False, True, False]
    dead = torch.tensor([False, False, True, False])
    assert sae.underused(dead).tolist() == [True, False, False, False]  # dead ones are AuxK's


def test_aux_zipf_loss_reaches_only_underused_latents():
    sae = make("mutual", aux=AuxConfig(aux_coef=0.0, k_aux=8), zipf_coef=1.0)
    x = torch.randn(32, 32)
    assert "aux_zipf" in sae.training_loss(x, StepContext()).terms
    assert sae.training_loss(x, StepContext()).terms["aux_zipf"] == 0  # no frequency tracked yet
    freq = torch.full((192,), 4 / 192)
    low = torch.randperm(192)[:30]
    freq[low] = 0.001
    freq[~torch.isin(torch.arange(192), low)] += 30 * (4 / 192 - 0.001) / 162  # keep sum = k
    sae.feature_freq.copy_(freq)
    sae.freq_updates.fill_(1)
    underused = sae.underused(None)
    assert set(underused.nonzero().flatten().tolist()) == set(low.tolist())
    x_hat = sae.decode(sae.activate(sae.encode_pre(x), StepContext())).detach()
    loss = sae.auxk_loss(EncoderPass(sae, x, StepContext()), x, x_hat, underused, k_aux=sae.cfg.k)
    assert loss > 0
    assert loss != sae.auxk_loss(EncoderPass(sae, x, StepContext()), x, x_hat, underused)  # not --k-aux
    loss.backward()
    touched = sae.W_dec.grad.abs().sum(dim=1) > 0
    assert touched.any() and not (touched & ~underused).any()
    sae.zero_grad()
    out = sae.training_loss(x, StepContext())
    assert out.terms["aux_zipf"] == pytest.approx(float(loss.detach()))
    assert "aux_zipf" not in make("mutual", zipf_coef=0.0).training_loss(x, StepContext()).terms


def test_validation():
    with pytest.raises(SaelabError, match="choice-mode"):
        make("token")
    with pytest.raises(SaelabError, match="zipf"):
        make("feature", zipf_alpha=-1.0)


def test_feature_mode_save_load_roundtrip(tmp_path):
    sae = make("feature", d_sae=32)
    x = torch.randn(128, 32)
    z = sae.encode_pre(x)
    sae.update_inference_state(SparseCode.from_dense(sae.activate(z, StepContext())))
    loaded = sae_io.load_sae(sae_io.save_sae(sae, tmp_path / "fc"))
    assert loaded.threshold.shape == (32,)
    assert torch.equal(loaded.threshold, sae.threshold) and torch.equal(loaded.feature_freq, sae.feature_freq)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), sae.encode(x))


# -- planted-dictionary recovery -------------------------------------------------------------------------
@pytest.mark.parametrize("mode,steps", [("mutual", 1000), ("feature", 800)])
def test_planted_dictionary_recovery(mode, steps):
    sae, data = fit_toy(make(mode, seed=1), steps)
    assert mmcs(sae.W_dec, data.dictionary) > 0.9  # mutual ~0.97, feature ~0.99 here
    with torch.no_grad():
        l0 = (sae.encode(data.sample(4096)) != 0).sum(dim=1).float().mean()
    assert 3 < float(l0) < 5  # inference thresholds keep the mean L0 near k = 4


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_feature_choice_calibration_gives_every_latent_its_budget_on_the_sample(alpha):
    sae = make("feature", zipf_alpha=alpha)
    sae.feature_freq.copy_(torch.rand(192))  # Zipf budgets follow the frequency ranks
    x = torch.randn(2000, 32)
    sae.calibrate_inference(x, chunk=300)
    with torch.no_grad():
        fired = (sae.encode(x) != 0).sum(dim=0)
    budget = sae.capacities(2000)
    assert torch.equal(fired, torch.minimum(budget, (sae.encode_pre(x) > 0).sum(dim=0)))
    assert int(budget.sum()) == 4 * 2000


def test_mutual_choice_calibration_is_batchtopks():
    mutual, batch = make("mutual"), BatchTopKSAE(32, make().cfg, make().options)
    batch.load_state_dict({k: v for k, v in mutual.state_dict().items() if k in batch.state_dict()})
    x = torch.randn(500, 32)
    mutual.calibrate_inference(x)
    batch.calibrate_inference(x)
    assert torch.equal(mutual.threshold, batch.threshold) and torch.isfinite(mutual.threshold)
