"""BatchTopK SAE (docs/algorithms.md, "BatchTopK"): exactly k*B nonzeros in training, running scalar threshold at
inference (L0 ~ k on held-out data), AuxK as TopK, fold/save invariance, planted-dictionary recovery."""

import pytest
import torch
from helpers import assert_encoder_gradient_only_at_selected, fit_toy

from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.kernels import SparseCode
from saelab.sae import io as sae_io
from saelab.sae.base import StepContext
from saelab.sae.batchtopk import BatchTopKSAE, batch_topk_layout, ema_threshold_
from saelab.sae.topk import AuxConfig, TopKConfig
from saelab.synthetic import mmcs
from saelab.train.step import train_step


def make(d_in=32, d_sae=192, k=4, seed=1, aux_coef=1 / 32, input_norm="none", **topk):
    torch.manual_seed(seed)
    cfg = SAEConfig(architecture="batchtopk", d_sae=d_sae, k=k, input_norm=input_norm)
    return BatchTopKSAE(d_in, cfg, {"aux": AuxConfig(aux_coef=aux_coef), "topk": TopKConfig(**topk)})


def test_training_code_has_exactly_k_times_batch_nonzeros():
    sae = make()
    x = torch.randn(64, 32)
    a = sae.activate(sae.encode_pre(x), StepContext())
    per_row = (a != 0).sum(dim=1).float()
    assert int(per_row.sum()) == 4 * 64
    assert per_row.mean() == 4
    assert per_row.std() > 0  # the per-token L0 varies
    assert (a >= 0).all()


def test_training_selection_is_the_global_top_kb():
    sae = make(rescale_by_decoder_norm=False)
    z = torch.randn(16, 192)
    a = sae.activate(z, StepContext())
    kept = z[a != 0]
    assert kept.numel() == 64
    assert kept.min() >= z[a == 0].max()
    assert torch.equal(a[a != 0], z[a != 0])  # values are the pre-activations themselves


def test_batch_topk_layout_keeps_the_largest_entries_of_the_whole_batch():
    scores = torch.randn(8, 10)
    layout = batch_topk_layout(scores, 5)
    assert layout.nnz == 5 and layout.batch == 8
    kept = layout.to_dense(torch.ones(5)).bool()
    assert torch.equal(kept, scores >= scores.reshape(-1).topk(5).values[-1])
    assert batch_topk_layout(scores, 1000).nnz == 80  # capped at the batch size


def test_unselected_latents_get_zero_encoder_gradient():
    sae = make(aux_coef=0.0)
    out = sae.training_loss(torch.randn(3, 32), StepContext())
    out.loss.backward()
    assert_encoder_gradient_only_at_selected(sae, out)


def test_rescaling_selects_on_z_times_decoder_norm():
    sae = make(d_sae=4, k=1)
    with torch.no_grad():
        sae.W_dec[0] *= 3.0  # latent 0: smaller z, larger decoder norm
    z = torch.tensor([[1.0, 2.0, -1.0, 0.5]])
    assert sae.activate(z, StepContext())[0].nonzero().flatten().tolist() == [0]
    sae.topk_cfg.rescale_by_decoder_norm = False
    assert sae.activate(z, StepContext())[0].nonzero().flatten().tolist() == [1]


def test_inference_is_scalar_threshold_jumprelu():
    sae = make()
    z = torch.randn(32, 192)
    assert (sae.activate(z) == 0).all()  # theta = +inf before any training step
    sae.threshold.fill_(0.7)
    expected = torch.where(z > 0.7, z, torch.zeros_like(z))
    assert torch.equal(sae.activate(z), expected)
    x = torch.randn(5, 32)
    assert torch.equal(sae.encode(x), expected_code(sae, x))


def expected_code(sae, x):
    z = sae.encode_pre(x)
    return z * (z > sae.threshold)


def test_threshold_running_minimum():
    sae = make(threshold_rate=0.25)
    a1 = torch.tensor([[0.0, 0.5, 2.0], [0.3, 0.0, 0.0]])
    sae.update_inference_state(SparseCode.from_dense(a1))
    assert torch.isclose(sae.threshold, torch.tensor(0.3))  # first update sets theta directly
    a2 = torch.tensor([[1.0, 0.0, 0.9]])
    sae.update_inference_state(SparseCode.from_dense(a2))
    assert torch.isclose(sae.threshold, torch.tensor(0.75 * 0.3 + 0.25 * 0.9))
    before = sae.threshold.clone()
    sae.update_inference_state(SparseCode.from_dense(torch.zeros(2, 3)))  # nothing kept: unchanged
    assert torch.equal(sae.threshold, before)


def test_ema_threshold_elementwise():
    theta = torch.tensor([float("inf"), 1.0, 1.0])
    ema_threshold_(theta, torch.tensor([0.4, 3.0, float("inf")]), 0.5)
    assert torch.allclose(theta, torch.tensor([0.4, 2.0, 1.0]))


def test_train_step_updates_threshold_from_the_training_code():
    sae = make()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    out = train_step(sae, opt, torch.randn(64, 32), StepContext())
    assert torch.isclose(sae.threshold, out.code.dense()[out.code.dense() > 0].min())


def test_auxk_as_topk():
    sae = make(aux_coef=1.0)
    x = torch.randn(32, 32)
    assert sae.training_loss(x, StepContext()).terms["auxk"] == 0
    dead = torch.zeros(192, dtype=torch.bool)
    dead[:50] = True
    assert sae.training_loss(x, StepContext(dead=dead)).terms["auxk"] > 0


def test_invalid_threshold_rate():
    with pytest.raises(SaelabError, match="threshold-rate"):
        make(threshold_rate=0.0)


def test_save_load_with_folded_input_scale_keeps_codes(tmp_path):
    sae = make(input_norm="constant")
    with torch.no_grad():
        sae.input_scale.fill_(2.5)
        sae.b_dec.copy_(torch.randn(32) * 0.1)
    x = torch.randn(256, 32)
    z = sae.encode_pre(sae.normalize(x)[0])
    sae.update_inference_state(SparseCode(layout := batch_topk_layout(z.relu(), 4 * 256), z[layout.rows, layout.indices].relu()))
    loaded = sae_io.load_sae(sae_io.save_sae(sae, tmp_path / "btk"))
    assert loaded.input_scale == 1
    assert torch.equal(loaded.threshold, sae.threshold)
    with torch.no_grad():
        assert torch.allclose(loaded.encode(x), sae.encode(x), atol=1e-5)
        assert torch.allclose(loaded(x), sae(x), atol=1e-5)


@pytest.fixture(scope="module")
def trained():
    return fit_toy(make(seed=1), 2000)


def test_planted_dictionary_recovery(trained):
    sae, data = trained
    assert mmcs(sae.W_dec, data.dictionary) > 0.9  # about 0.92-0.95 over torch seeds 1-3


def test_inference_l0_is_about_k_on_held_out_data(trained):
    sae, data = trained
    with torch.no_grad():
        a = sae.encode(data.sample(8192))
    l0 = (a != 0).sum(dim=1).float()
    assert abs(float(l0.mean()) - 4) < 0.4
    assert l0.std() > 0  # still adaptive per token


@pytest.mark.parametrize("skewed", [False, True])
def test_batch_topk_layout_candidate_path_equals_the_full_search(skewed):
    """Per-row candidates then a batch-level top-k, or (when one row could hold more winners than candidates,
    as with one row far above the rest) the full flattened search: the same entries either way."""
    scores = torch.randn(64, 300, generator=torch.Generator().manual_seed(0))
    if skewed:
        scores[5] += 10.0  # row 5 alone holds all 256 winners: more than its 16 candidates
    layout = batch_topk_layout(scores, 4 * 64)
    expected = scores >= scores.reshape(-1).topk(4 * 64).values[-1]
    assert torch.equal(layout.to_dense(torch.ones(layout.nnz)).bool(), expected)
    assert torch.equal(layout.offsets.diff(), expected.sum(1))
    if skewed:
        assert int(layout.offsets.diff()[5]) == 256


def test_calibration_makes_the_sample_l0_exactly_k_and_reads_in_chunks():
    sae = make()
    x = torch.randn(1000, 32)
    sae.calibrate_inference(x, chunk=96)  # 11 chunks, the last partial
    chunked = sae.threshold.clone()
    with torch.no_grad():
        assert int((sae.encode(x) != 0).sum()) == 4 * 1000  # mean L0 exactly k on the calibration tokens
        z = sae.encode_pre(x).relu().flatten().sort(descending=True).values
    assert float(chunked) == pytest.approx(float(z[3999] + z[4000]) / 2)
