"""The README's picture of `saelab serve`, and a walk through the researcher's loop on a real SAE: find latents by
token search on the index, open one, show it on your own text, steer with it, all in headless Chromium.

    python scripts/serve_screenshot.py --sae runs/sae/blocks.15.hook_resid_pre --token LORD \\
        --text "And the LORD spake unto Moses, saying" --prompt "My favourite food is" --alpha 16

Needs the SAE's dashboard (`saelab dashboard --sae ... --cache ...`), Debian's chromium and playwright (the dev
extra). Prints what each step showed and writes dashboards/serve_screenshot.png (--out to change).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sae", required=True)
    parser.add_argument("--token", default="LORD", help="What to type into the index search.")
    parser.add_argument("--latent", type=int, default=None, help="The latent to open (default: the first match).")
    parser.add_argument("--text", default="And the LORD spake unto Moses, saying")
    parser.add_argument("--prompt", default="My favourite food is")
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--out", default="dashboards/serve_screenshot.png")
    args = parser.parse_args()

    command = [sys.executable, "-m", "saelab", "serve", "--sae", args.sae, "--port", "0"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        url = server.stdout.readline().split(" at ")[1].split()[0]
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(url + "index.html")
            page.fill("#search", args.token)
            print(page.text_content("#token-count"))
            matches = page.eval_on_selector_all(
                "#token-matches tbody tr", "rows => rows.slice(0, 5).map(r => r.innerText.replace(/\\s+/g, ' '))"
            )
            print("\n".join("  " + row for row in matches))
            latent = args.latent
            if latent is None:
                latent = int(page.get_attribute("#token-matches tbody tr", "data-id"))
            page.goto(f"{url}feature.html?id={latent}")
            page.wait_for_selector("#live-text")
            page.fill("#live-text", args.text)
            page.click("#live-run")
            page.wait_for_selector("#live-summary", timeout=120_000)
            print(f"latent {latent} on {args.text!r}: {page.text_content('#live-summary')}")
            tokens = page.eval_on_selector_all(
                "#live-out .tok", "spans => spans.map(s => [s.textContent, Number(s.dataset.act)])"
            )
            print("  " + " ".join(f"{text}[{act:.1f}]" if act else text for text, act in tokens))
            page.fill("#steer-alpha", str(args.alpha))
            page.fill("#steer-prompt", args.prompt)
            page.fill("#steer-tokens", str(args.tokens))
            page.click("#steer-run")
            page.wait_for_selector("#steer-steered", timeout=300_000)
            print(f"steer add {args.alpha:g}, prompt {args.prompt!r}:")
            print(f"  without: {page.text_content('#steer-clean')!r}")
            print(f"  with:    {page.text_content('#steer-steered')!r}")
            print(f"  {page.text_content('#steer-loss')}")
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=args.out, clip={"x": 0, "y": 0, "width": 1500, "height": 1100})
            print(f"wrote {Path(args.out)}")
            browser.close()
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(60)


if __name__ == "__main__":
    main()
