"""`saelab serve`: load one SAE and its model once and serve its dashboard with the live panels (per-token
activations of your own text, steering, label editing) until Ctrl-C (saelab.dashboard.server)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from saelab.config import ServeCommand
from saelab.errors import SaelabError


@dataclass
class ServeResult:
    """url: where the dashboard was served."""

    url: str

    def lines(self) -> list[str]:
        return [f"stopped serving {self.url}"]


def run(command: ServeCommand, progress: bool = True) -> ServeResult:
    """Load the SAE, its dashboard and its model, then serve until interrupted; the URL is printed once listening."""
    from saelab.analysis.evaluate import eval_model_name
    from saelab.dashboard.live import LiveSAE
    from saelab.dashboard.server import LocalServer, create_app
    from saelab.models import load_model
    from saelab.sae.io import load_saes

    options = command.serve
    if not options.sae:
        raise SaelabError("No SAE given: pass its folder with --sae DIR.")
    site = Path(options.dashboard) if options.dashboard else Path(options.sae) / "dashboard"
    ((_, sae, _),) = load_saes([options.sae], command.model.device)
    model_name, _ = eval_model_name([sae], [options.sae], command.model.model)
    live_sae = LiveSAE(sae, None, options.sae, options.max_text_tokens)
    app = create_app(live_sae, site)  # a missing or mismatched site fails before the model loads
    live_sae.model = load_model(model_name, device=command.model.device, dtype=command.model.model_dtype)
    server = LocalServer(app, options.host, options.port)
    print(f"serving the dashboard of {options.sae} at {server.url} (Ctrl-C stops)", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn stops cleanly, then passes the signal on
        pass
    return ServeResult(server.url)
