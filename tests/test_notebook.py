"""scripts/steering.ipynb runs top to bottom (nbclient, the venv's own Python kernel), training its small SAE."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parent.parent / "scripts" / "steering.ipynb"


def outputs(cell) -> str:
    texts = []
    for output in cell.get("outputs", []):
        texts.append(output.get("text", "") + output.get("data", {}).get("text/plain", ""))
    return "\n".join(texts)


@pytest.mark.slow
def test_steering_notebook_runs_offline_from_scratch(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_SAE", str(tmp_path / "no-sae-yet"))  # so the notebook trains its own small SAE
    monkeypatch.setenv("SAELAB_ACTIVATIONS", str(tmp_path / "no-cache-yet"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                   ).execute()  # raises CellExecutionError with the cell's traceback on any error
    text = "\n".join(outputs(cell) for cell in notebook.cells if cell.cell_type == "code")
    assert (tmp_path / "runs/notebook/sae/blocks.15.hook_resid_pre/sae.safetensors").is_file()
    assert "4608 latents at blocks.15.hook_resid_pre" in text
    assert "[[ LORD]]" in text  # the chosen latent's top contexts include the token it was chosen on
    assert "mean loss change after tokens where latent" in text
    figures = sum("application/vnd.plotly.v1+json" in o.get("data", {}) for c in notebook.cells
                  for o in c.get("outputs", []))
    assert figures == 3
