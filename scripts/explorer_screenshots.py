"""Screenshots of the web explorer on the default model and SAE, for README.md.

Serves the default model with the shipped default SAE (and its catalog, where
``saescope catalog default`` has built it), then in headless Chromium: searches for a concept,
opens the top hit's page, and steers with it. Writes ``docs/explorer-*.png``.

    .venv/bin/python scripts/explorer_screenshots.py [--query ocean] [--out docs]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402
from bench.web_latency import serve_default_sae  # noqa: E402
from tests.support.browser import launch  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--query", default="ocean")
    p.add_argument("--prompt", default="Tell me about your weekend.")
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    common.set_threads(args.threads)
    with serve_default_sae(args) as setup, launch() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.set_default_timeout(300_000)
        base = f"{setup.http_url}/{setup.application}/"
        page.goto(f"{base}#/search?q={args.query}")
        page.wait_for_selector("#search-hits")
        page.screenshot(path=str(args.out / "explorer-search.png"))
        page.locator("#search-hits a.feature-link").first.click()
        page.wait_for_selector("main[data-rendered]")
        feature = page.get_attribute("main", "data-rendered")
        page.screenshot(path=str(args.out / "explorer-feature.png"))
        page.goto(f"{base}#/steer?f={feature}")
        page.wait_for_selector(".iv .hint a")
        page.fill("#steer-prompt", args.prompt)
        page.fill("#max-tokens", "40")
        page.click("#generate")
        page.wait_for_selector("#steer-output[data-state='done']")
        page.screenshot(path=str(args.out / "explorer-steer.png"))
        page.goto(f"{base}#/prompt?text=The waves crashed on the rocky shore at night.")
        page.wait_for_selector("#prompt-top")
        page.locator("#prompt-tokens .tok").nth(3).click()
        page.screenshot(path=str(args.out / "explorer-prompt.png"))
    print(f"wrote {args.out}/explorer-*.png (feature {feature})")


if __name__ == "__main__":
    main()
