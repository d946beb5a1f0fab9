"""Dead-latent statistics (saelab.analysis.dead) on hand-built histories with known answers."""

import json
import math

import pytest
import torch
from helpers import perturb

from saelab.analysis.dead import LatentHistory, Revival, decoder_geometry
from saelab.cli import main
from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.sae.io import save_sae
from saelab.sae.registry import create_sae, sae_sections
from saelab.train.history import LATENT_HISTORY, LatentRecorder

D_SAE, BATCH, RECORDS, DEAD_TOKENS = 10, 100, 10, 300


def synthetic_counts() -> torch.Tensor:
    """[10 records, 10 latents], one record per 100-token window, dead after 300 silent tokens:
    0 fires on every token; 1, 2, 4, 6 fire throughout; 3 fires in records 0-4 and then stops (silent from record 5,
    dead from record 7); 5 fires in record 0, is dead at records 3-4 and fires again from record 5 (no resampling);
    7 fires in record 0, is dead at records 3-4, is resampled after record 4 and fires again from record 6;
    8 never fires (dead at 2-4, resampled after record 4, dead again from record 7); 9 never fires (dead from 2)."""
    counts = torch.zeros(RECORDS, D_SAE, dtype=torch.long)
    counts[:, 0] = BATCH
    counts[:, [1, 2, 4, 6]] = 3
    counts[:5, 3] = 3
    counts[0, [5, 7]] = 3
    counts[5:, 5] = 3
    counts[6:, 7] = 3
    return counts


def synthetic_history_file(folder) -> None:
    recorder = LatentRecorder(D_SAE, torch.device("cpu"))
    for r, row in enumerate(synthetic_counts()):
        recorder.add(row)
        recorder.log_step((r + 1) * BATCH, last=r == RECORDS - 1)
        if r == 4:
            recorder.resampled(5, 500, torch.tensor([7, 8]))
    since_fired = torch.zeros(D_SAE, dtype=torch.long)
    since_fired[[3, 8, 9]] = torch.tensor([520, 500, 1000])  # 3 last fired at token 480, inside record 4's window
    info = {
        "run": "synthetic",
        "hook": "blocks.0.hook_resid_post",
        "dead_tokens": DEAD_TOKENS,
        "batch_size": BATCH,
        "log_every": 1,
    }
    (folder / LATENT_HISTORY).write_bytes(recorder.to_bytes(since_fired, info))


@pytest.fixture
def run_folder(tmp_path):
    options = {name: cls() for name, cls in sae_sections().items() if name != "sae"}
    sae = perturb(
        create_sae(8, SAEConfig(architecture="topk", d_sae=D_SAE, k=2), options, {"hook": "blocks.0.hook_resid_post"})
    )
    folder = save_sae(sae, tmp_path / "sae")
    synthetic_history_file(folder)
    return folder


def test_history_round_trips_through_the_file(run_folder):
    history = LatentHistory.load(run_folder)
    assert torch.equal(history.counts, synthetic_counts())
    assert history.tokens.tolist() == [100 * (r + 1) for r in range(RECORDS)]
    assert history.dead_tokens == DEAD_TOKENS and history.info["run"] == "synthetic"
    assert history.resample_steps.tolist() == [5] and history.resample_tokens.tolist() == [500]
    assert [r.tolist() for r in history.resampled] == [[7, 8]]


def test_silence_deaths_and_revivals_have_the_known_answers(run_folder):
    history = LatentHistory.load(run_folder)
    silence = history.silence()
    assert silence[:, 3].tolist() == [0, 0, 0, 0, 0, 100, 200, 300, 400, 520]  # last row: the exact since_fired
    assert silence[:, 7].tolist() == [0, 100, 200, 300, 400, 100, 0, 0, 0, 0]  # clock restarts at the resampling
    assert silence[:, 8].tolist() == [100, 200, 300, 400, 500, 100, 200, 300, 400, 500]
    assert silence[:, 9].tolist() == [100 * (r + 1) for r in range(RECORDS)]

    deaths = history.deaths()
    assert deaths.dead[:, 3].nonzero().squeeze(1).tolist() == [7, 8, 9]
    assert deaths.dead[:, 5].nonzero().squeeze(1).tolist() == [3, 4]
    assert deaths.dead[:, 8].nonzero().squeeze(1).tolist() == [2, 3, 4, 7, 8, 9]
    assert deaths.dead_at_end.nonzero().squeeze(1).tolist() == [3, 8, 9]
    assert deaths.ever_dead.nonzero().squeeze(1).tolist() == [3, 5, 7, 8, 9]
    assert deaths.never_revived.nonzero().squeeze(1).tolist() == [3, 8, 9]
    assert deaths.died_at.tolist() == [-1, -1, -1, 480, -1, -1, -1, -1, 500, 0]
    assert deaths.first_death.tolist() == [-1, -1, -1, 500, -1, 100, -1, 100, 0, 0]
    assert deaths.revivals == [Revival(5, 4, 5, 600, -1), Revival(7, 4, 6, 700, 0)]
    assert deaths.revived(True).nonzero().squeeze(1).tolist() == [7]
    assert deaths.revived(False).nonzero().squeeze(1).tolist() == [5]

    stricter = history.deaths(dead_tokens=500)  # only 500+ silent tokens count
    assert stricter.dead_at_end.nonzero().squeeze(1).tolist() == [3, 8, 9]
    assert stricter.ever_dead.nonzero().squeeze(1).tolist() == [3, 8, 9] and stricter.revivals == []


def test_densities_and_histograms(run_folder):
    history = LatentHistory.load(run_folder)
    assert torch.equal(history.density(), synthetic_counts().double() / BATCH)
    histogram = history.density_histogram()  # 40 bins of 0.25 over log10(f + 1e-10) in [-10, 0]
    assert histogram.shape == (RECORDS, 40) and (histogram.sum(1) == D_SAE).all()
    f_003_bin = math.floor((math.log10(0.03) + 10) * 4)  # 33
    assert histogram[0, 39] == 1 and histogram[0, f_003_bin] == 7 and histogram[0, 0] == 2  # f = 1, 0.03, 0
    assert histogram[9, f_003_bin] == 6 and histogram[9, 0] == 3

    counts, edges = history.since_fired_histogram(bins=10)
    assert edges.tolist() == [100.0 * i for i in range(11)]
    assert counts.tolist() == [7, 0, 0, 0, 0, 2, 0, 0, 0, 1]  # 0 x7, 520 and 500, 1000 (the last edge)

    final, tokens = history.final_density(0.2)
    assert tokens == 200 and torch.equal(final, synthetic_counts()[8:].sum(0).double() / 200)
    assert history.final_density(1.0)[1] == 1000 and history.final_density(0.01)[1] == 100


def test_decoder_geometry_known_cosines():
    e = torch.eye(4, dtype=torch.float64)
    W_dec = torch.stack([e[0], 3 * e[0], e[1], -2 * e[1], e[2], 5 * (e[2] + e[3]) / math.sqrt(2)])
    groups = {
        "dense": torch.tensor([1, 1, 0, 0, 0, 0]).bool(),
        "dead": torch.tensor([0, 0, 1, 1, 0, 0]).bool(),
        "other": torch.tensor([0, 0, 0, 0, 1, 1]).bool(),
        "single": torch.tensor([0, 0, 0, 0, 1, 0]).bool(),
        "empty": torch.zeros(6, dtype=torch.bool),
    }
    result = decoder_geometry(W_dec, 2 * e[0], groups, mean_activation=e[3])
    half = 1 / math.sqrt(2)
    expected = {
        "dense": (1.0, 1.0, 0.0, 1.0, 1.0),
        "dead": (0.0, 0.0, 0.0, 1.0, 1.0),
        "other": (0.0, 0.0, half / 2, half, half),
    }
    for name, (cos_b, abs_b, abs_mean, nearest, within) in expected.items():
        stats = result[name]
        assert stats["latents"] == 2
        assert stats["cos_b_dec"] == pytest.approx(cos_b) and stats["abs_cos_b_dec"] == pytest.approx(abs_b)
        assert stats["abs_cos_mean_activation"] == pytest.approx(abs_mean)
        assert stats["nearest_abs_cos"] == pytest.approx(nearest)
        assert stats["within_group_abs_cos"] == pytest.approx(within)
    assert result["single"]["within_group_abs_cos"] is None and result["empty"] is None
    assert decoder_geometry(W_dec, 2 * e[0], groups)["dense"]["cos_mean_activation"] is None


def test_cli_writes_the_report_and_summary(run_folder, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["dead", "--run", str(run_folder), "--out", str(out), "--quiet"]) == 0
    assert "dead at the end: 3 of 10 (30.00%)" in capsys.readouterr().out
    summary = json.loads((out / "dead.json").read_text())
    dead = summary["dead"]
    assert (dead["at_end"], dead["ever"], dead["never_revived"], dead["revived"]) == (3, 5, 3, 2)
    assert (dead["revived_after_resample"], dead["revived_otherwise"]) == (1, 1)
    assert dead["latents_dead_at_end"] == [3, 8, 9] and dead["latents_revived_after_resample"] == [7]
    assert dead["died_at_tokens"]["median"] == 480
    assert summary["resamples"] == [{"step": 5, "tokens": 500, "latents": 2, "revived_after": 1}]
    density = summary["final_density"]
    assert density["over_tokens"] == 200 and density["dense_fraction"] == pytest.approx(0.1)
    assert density["below_1e-05_fraction"] == pytest.approx(0.3)
    assert [r["dead"] for r in summary["over_training"]] == [0, 0, 2, 4, 4, 1, 1, 3, 3, 3]
    assert summary["decoder_geometry"]["dead"]["latents"] == 3
    assert summary["decoder_geometry"]["dense"]["latents"] == 1
    page = (out / "dead_report.html").read_text()
    assert page.count("Plotly.newPlot") == 5 and "<script src=" not in page  # plotly.js embedded, five figures
    assert len(page) > 1_000_000


def test_a_folder_without_history_is_a_clear_error(run_folder, capsys):
    (run_folder / LATENT_HISTORY).unlink()
    with pytest.raises(SaelabError, match="trained before latent histories were recorded.*Retrain"):
        LatentHistory.load(run_folder)
    assert main(["dead", "--run", str(run_folder), "--quiet"]) == 2
    assert "Retrain it with `saelab train`" in capsys.readouterr().err
    assert main(["dead", "--quiet"]) == 2
    assert "Pass --sae" in capsys.readouterr().err
