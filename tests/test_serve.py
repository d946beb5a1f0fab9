"""`saelab serve` and `saelab label`: the live computations (saelab.dashboard.live) against the steering API they
wrap, the HTTP endpoints (Starlette's test client), a server that keeps serving while the model is busy, labels in
the sidecar, the site and the CLI, and the one-sentence errors. The model is the tiny random one; the browser side
is in test_dashboard_browser.py."""

from __future__ import annotations

import json
import threading
import urllib.request

import pytest
import torch
from helpers import perturb
from starlette.testclient import TestClient

from saelab.activations.cache import build_cache
from saelab.cli import main
from saelab.config import SAEConfig
from saelab.dashboard.live import LiveSAE
from saelab.dashboard.server import LocalServer, create_app
from saelab.dashboard.site import read_data_file
from saelab.errors import SaelabError
from saelab.labels import Label, read_labels, set_label
from saelab.sae.io import load_sae, save_sae
from saelab.sae.registry import create_sae
from saelab.steering import Add, feature_activations, generate, intervention_for, next_token_loss

HOOK = "blocks.1.hook_resid_post"
TEXT = "In the beginning God created the heaven and the earth."


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model, cache_config):
    """A saved TopK SAE on the tiny model with a real dashboard of 8 latents."""
    root = tmp_path_factory.mktemp("serve")
    build_cache(cache_config(root / "cache"), model=tiny_model, progress=False)
    sae = perturb(create_sae(64, SAEConfig(architecture="topk", d_sae=96, k=8), metadata={"hook": HOOK, "model": "tiny-native"}))
    folder = save_sae(sae, root / "sae")
    argv = ["dashboard", "--sae", str(folder), "--cache", str(root / "cache"), "--model", "tiny-native", "--quiet"]
    assert main([*argv, "--n-features", "8"]) == 0
    return folder, load_sae(folder).eval()


@pytest.fixture
def live(served, tiny_model):
    folder, sae = served
    (folder / "labels.json").unlink(missing_ok=True)
    return LiveSAE(sae, tiny_model, folder, max_text_tokens=64)


@pytest.fixture
def client(live, served):
    return TestClient(create_app(live, served[0] / "dashboard"))


def most_active(live, text=TEXT) -> int:
    """The latent with the largest activation anywhere in the text."""
    return live.activations(text, 0)["top"][0]["latent"]


def test_activations_are_the_steering_api_s_codes_without_special_tokens(live, tiny_model, served):
    _, sae = served
    tokens, code = feature_activations(tiny_model, sae, TEXT)
    assert tokens[0] == tiny_model.tokenizer.decode([tiny_model.tokenizer.bos_token_id])  # BOS, left out below
    latent = int(code.abs().max(0).values.argmax())
    answer = live.activations(TEXT, latent)
    assert answer["tokens"] == tokens[1:] and "".join(answer["tokens"]) == TEXT
    assert answer["acts"] == pytest.approx(code[1:, latent].tolist())
    strongest = code[1:].abs().max(0).values
    expected = [i for i in strongest.argsort(descending=True, stable=True).tolist() if strongest[i] > 0][:12]
    assert [row["latent"] for row in answer["top"]] == expected and expected[0] == latent
    for row in answer["top"]:
        column = code[1:, row["latent"]]
        assert row["max"] == pytest.approx(float(column[row["position"]])) and abs(row["max"]) == pytest.approx(
            float(column.abs().max())
        )
        assert row["token"] == answer["tokens"][row["position"]] and row["firing"] == int((column != 0).sum())


def test_steer_is_generate_and_next_token_loss_with_and_without_the_intervention(live, tiny_model, served):
    _, sae = served
    latent = most_active(live)
    answer = live.steer(latent, "add", 40.0, "In the beginning", max_new_tokens=6)
    assert answer["clean"] == generate(tiny_model, "In the beginning", max_new_tokens=6)[0]
    assert answer["steered"] == generate(tiny_model, "In the beginning", sae, [Add(latent, 40.0)], max_new_tokens=6)[0]
    assert answer["steered"] != answer["clean"]  # a strong push changes the random model's greedy completion
    assert answer["reference"] == "In the beginning" + answer["clean"]
    assert answer["clean_loss"] == pytest.approx(next_token_loss(tiny_model, answer["reference"]))
    assert answer["steered_loss"] == pytest.approx(
        next_token_loss(tiny_model, answer["reference"], sae, [Add(latent, 40.0)])
    )
    assert answer["loss_change"] == pytest.approx(answer["steered_loss"] - answer["clean_loss"])
    # clamping a latent to what it already is changes nothing; the reference text is used when given
    clamp = live.steer(latent, "clamp", 0.0, "In the beginning", max_new_tokens=3, reference=TEXT)
    assert clamp["reference"] == TEXT
    assert clamp["steered_loss"] == pytest.approx(next_token_loss(tiny_model, TEXT, sae, [intervention_for("clamp", [latent], 0.0)]))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda live: live.activations("", 0), "Type some text first"),
        (lambda live: live.activations("word " * 80, 0), "at most 64"),
        (lambda live: live.activations(TEXT, 96), "from 0 to 95"),
        (lambda live: live.activations(TEXT, "3"), "from 0 to 95"),
        (lambda live: live.steer(0, "twist", 1.0, "Hi"), "--mode is one of add, clamp, project"),
        (lambda live: live.steer(0, "add", None, "Hi"), "--alpha takes a finite number"),
        (lambda live: live.steer(0, "add", 1.0, "Hi", max_new_tokens=0), "at least 1"),
        (lambda live: live.steer(0, "add", 1.0, "Hi", max_new_tokens=1000), "at most 128 new tokens"),
        (lambda live: live.steer(0, "add", 1.0, "   "), "Type some prompt first"),
        (lambda live: live.set_label(0, "two\nlines"), "one line"),
        (lambda live: live.set_label(0, 5), "are text"),
    ],
)
def test_bad_requests_are_one_sentence(live, call, message):
    with pytest.raises(SaelabError, match=message):
        call(live)


def test_labels_sidecar_round_trips_and_refuses_a_corrupt_file(tmp_path):
    assert read_labels(tmp_path) == {}
    set_label(tmp_path, 7, " LORD ", "fires on LORD\nin capitals")
    set_label(tmp_path, 3, "", "notes only")
    assert read_labels(tmp_path) == {3: Label("", "notes only"), 7: Label("LORD", "fires on LORD\nin capitals")}
    assert set_label(tmp_path, 3, "", "") == {7: Label("LORD", "fires on LORD\nin capitals")}  # both empty: removed
    with pytest.raises(SaelabError, match="outside this SAE's latents 0..9"):
        set_label(tmp_path, 10, "x", d_sae=10)
    (tmp_path / "labels.json").write_text('{"labels": [1, 2]}')
    with pytest.raises(SaelabError, match="not a readable labels file"):
        read_labels(tmp_path)
    with pytest.raises(SaelabError, match="not a local folder"):
        read_labels(tmp_path / "absent")


def test_http_endpoints(client, live):
    info = client.get("/api/info").json()
    assert info["d_sae"] == 96 and info["hook"] == HOOK and info["labels_editable"] is True
    latent = most_active(live)
    answer = client.post("/api/activations", json={"text": TEXT, "latent": latent})
    assert answer.status_code == 200 and answer.json() == json.loads(json.dumps(live.activations(TEXT, latent)))
    steered = client.post("/api/steer", json={"latent": latent, "alpha": 40.0, "prompt": "In the", "max_new_tokens": 3})
    assert steered.status_code == 200 and steered.json()["clean"] == live.steer(latent, "add", 40.0, "In the", 3)["clean"]
    for body, error in (
        ({"text": TEXT}, "The request lacks latent."),
        ({"text": TEXT, "latent": -1}, "The latent must be a whole number from 0 to 95; got -1."),
    ):
        refused = client.post("/api/activations", json=body)
        assert refused.status_code == 400 and refused.json() == {"error": error}
    assert client.post("/api/steer", content=b"not json").json() == {"error": "The request body is not JSON."}
    # labels: written to the sidecar, and the site's labels file is read fresh from it
    assert client.post("/api/labels", json={"latent": 5, "label": "five", "notes": "n"}).json() == {
        "5": {"label": "five", "notes": "n"}
    }
    assert read_labels(live.sae_folder) == {5: Label("five", "n")}
    script = client.get("/data/labels.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert script.text == 'window.SAELAB_LABELS = {"5":{"label":"five","notes":"n"}};\n'
    # the static site
    assert "saelab.renderIndex()" in client.get("/").text
    assert client.get("/feature.html").status_code == 200 and client.get("/data/summary.js").status_code == 200


def test_pages_are_served_while_the_model_is_busy(live, served):
    """A steering request that holds the model does not stop the server from answering pages and /api/info."""
    started, release = threading.Event(), threading.Event()
    original = live.steer

    def slow_steer(*args, **kwargs):
        started.set()
        assert release.wait(30)
        return original(*args, **kwargs)

    live.steer = slow_steer
    server = LocalServer(create_app(live, served[0] / "dashboard"), port=0).start()
    try:
        body = json.dumps({"latent": 0, "alpha": 1.0, "prompt": "In", "max_new_tokens": 1}).encode()
        request = urllib.request.Request(server.url + "api/steer", body, {"Content-Type": "application/json"})
        answers = []
        steering = threading.Thread(target=lambda: answers.append(json.load(urllib.request.urlopen(request))))
        steering.start()
        assert started.wait(30)
        page = urllib.request.urlopen(server.url + "feature.html?id=3").read().decode()
        info = json.load(urllib.request.urlopen(server.url + "api/info"))
        assert "saelab.renderFeature()" in page and info["d_sae"] == 96 and not answers  # still generating
        release.set()
        steering.join(30)
        assert set(answers[0]) == {"clean", "steered", "reference", "clean_loss", "steered_loss", "loss_change"}
    finally:
        release.set()
        server.stop()


def test_serve_refuses_a_missing_or_foreign_dashboard(live, served, tmp_path, capsys):
    folder, _ = served
    with pytest.raises(SaelabError, match="No dashboard in .*saelab dashboard --sae"):
        create_app(live, tmp_path)
    other = perturb(create_sae(64, SAEConfig(architecture="topk", d_sae=48, k=8), metadata={"hook": HOOK}))
    with pytest.raises(SaelabError, match="built for an SAE with 96 latents at blocks.1.hook_resid_post, not this one"):
        create_app(LiveSAE(other, None), folder / "dashboard")
    assert main(["serve", "--sae", str(folder), "--dashboard", str(tmp_path)]) == 2
    assert "No dashboard in" in capsys.readouterr().err
    with LocalServerHolder(live, folder) as taken:
        assert main(["serve", "--sae", str(folder), "--port", str(taken)]) == 2
        assert "Cannot listen on 127.0.0.1" in capsys.readouterr().err


class LocalServerHolder:
    """A running server whose port is taken for the duration of a with-block; yields the port."""

    def __init__(self, live, folder):
        self.server = LocalServer(create_app(live, folder / "dashboard"), port=0)

    def __enter__(self) -> int:
        self.server.start()
        return int(self.server.url.rsplit(":", 1)[1].strip("/"))

    def __exit__(self, *exc) -> None:
        self.server.stop()


def test_label_command_sets_lists_removes_and_refreshes_the_dashboard(served, capsys):
    folder, _ = served
    (folder / "labels.json").unlink(missing_ok=True)
    assert main(["label", "--sae", str(folder)]) == 0
    assert "no labels yet" in capsys.readouterr().out
    assert main(["label", "--sae", str(folder), "--feature", "3", "5", "--label", "the end", "--notes", "see 7"]) == 0
    assert f"updated {folder / 'dashboard/data/labels.js'}" in capsys.readouterr().out
    assert read_data_file(folder / "dashboard/data/labels.js") == {
        "3": {"label": "the end", "notes": "see 7"}, "5": {"label": "the end", "notes": "see 7"}
    }  # fmt: skip
    assert main(["label", "--sae", str(folder), "--feature", "5", "--remove"]) == 0
    assert main(["label", "--sae", str(folder)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "3: the end  [notes: see 7]"
    for argv, message in (
        (["--feature", "7", "96", "--label", "x"], "Latent 96 is outside this SAE's latents 0..95; nothing was"),
        (["--label", "x"], "Name the latent(s) to label with --feature"),
        (["--feature", "1", "--remove", "--label", "x"], "--remove takes no --label"),
    ):
        assert main(["label", "--sae", str(folder), *argv]) == 2
        assert message in capsys.readouterr().err
    assert 7 not in read_labels(folder)  # the bad id stopped the command before anything was written
    # a dashboard built afterwards carries the labels, and the index searches them (test_dashboard_browser.py)
    out = folder.parent / "relabelled"
    assert main(["dashboard", "--sae", str(folder), "--cache", str(folder.parent / "cache"), "--model", "none",
                 "--features", "3", "--out", str(out), "--quiet"]) == 0  # fmt: skip
    assert read_data_file(out / "data/labels.js") == {"3": {"label": "the end", "notes": "see 7"}}
    assert torch.equal(load_sae(folder).W_dec, served[1].W_dec)  # labelling leaves the SAE alone


def test_the_serve_command_serves_until_ctrl_c(served):
    """`saelab serve` in a process of its own: the URL it prints answers, and Ctrl-C stops it cleanly (exit 0)."""
    import os
    import signal
    import subprocess
    import sys

    folder, _ = served
    argv = [sys.executable, "-m", "saelab", "serve", "--sae", str(folder), "--model", "tiny-native", "--port", "0"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ)
    try:
        line = process.stdout.readline()
        assert line.startswith(f"serving the dashboard of {folder} at http://127.0.0.1:"), line + process.stderr.read()
        url = line.split(" at ")[1].split()[0]
        assert json.load(urllib.request.urlopen(url + "api/info"))["d_sae"] == 96
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert out.strip() == f"stopped serving {url}"


def test_a_site_built_by_an_older_saelab_gets_this_version_s_pages(live, served, tmp_path):
    """Pages and scripts come from the installed templates (they hold the live panels), data from the site; an
    older site without a token index gets an empty one instead of a 404."""
    import shutil

    from saelab.dashboard.site import templates_dir

    old = tmp_path / "old"
    shutil.copytree(served[0] / "dashboard", old)
    (old / "assets/app.js").write_text("/* an older app.js without live panels */")
    (old / "data/tokens.js").unlink()
    client = TestClient(create_app(live, old))
    for path, template in (("assets/app.js", "app.js"), ("feature.html", "feature.html"), ("", "index.html")):
        assert client.get("/" + path).text == (templates_dir() / template).read_text(encoding="utf-8"), path
    assert client.get("/data/tokens.js").text == "window.SAELAB_TOKENS = null;\n"
    assert client.get("/data/summary.js").text == (old / "data/summary.js").read_text(encoding="utf-8")
    assert client.get("/assets/plotly.min.js").status_code == 200
