"""The playground at `/` in a real browser (headless Chromium, Debian's package, driven by Playwright) against a real
gateway with an API key over a 2-peer swarm of SmolLM2: the key entered in the page, an answer streamed in with its
time to first token, a generation stopped (the gateway counts it cancelled), the swarm map showing both peers and
the route, and a hole once a peer is killed. Screenshots go to test-artifacts/ (ignored by git).

Skipped with the reason when Chromium (`apt install chromium`) or the `playwright` package is missing.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import httpx
import pytest

from swarm.model.source import resolve_model
from tests.e2e.test_gateway import MODEL, free_port
from tests.launcher import LocalSwarm

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
KEY = "playground-test-key"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (Debian: apt install chromium)")
playwright_api = pytest.importorskip("playwright.async_api", reason="the playwright package is not installed")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    resolve_model(MODEL)
    with LocalSwarm(tmp_path_factory.mktemp("playground")) as swarm:
        swarm.start_bootstrap()
        peers = [swarm.start_peer(MODEL, blocks, "--announce-period", "2", wait=False) for blocks in ("0:15", "15:30")]
        swarm.peer_procs = peers
        swarm.peer_ids = [LocalSwarm.peer_id(p) for p in peers]
        port = free_port()
        swarm.start_gateway(port, {"SWARM_INITIAL_PEERS": " ".join(swarm.initial_peers), "GATEWAY_API_KEYS": KEY})
        swarm.url = f"http://127.0.0.1:{port}"
        yield swarm


def cancelled(gateway) -> float:
    text = httpx.get(f"{gateway.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    found = re.search(r'^swarm_gateway_generations_total\{outcome="cancelled"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


async def test_chat_stop_and_the_swarm_map_in_a_real_browser(gateway):
    ARTIFACTS.mkdir(exist_ok=True)
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            await page.goto(gateway.url + "/")
            await page.wait_for_function("document.getElementById('notice').textContent.includes('API key')")
            await page.fill("#key", KEY)
            await page.dispatch_event("#key", "change")
            await page.wait_for_function(f"document.getElementById('model').textContent === {MODEL!r}")

            # an answer streams in, with its time to first token
            await page.fill("#temperature", "0")
            await page.fill("#max_tokens", "24")
            await page.fill("#input", "Name three colours.")
            await page.press("#input", "Enter")
            await page.wait_for_function("document.getElementById('stats').textContent.includes('first token')",
                                         timeout=120_000)
            answer = await page.text_content(".msg.assistant")
            assert answer and "[error" not in answer

            # the map: both peers over their spans, the route of that answer highlighted, no hole
            await page.wait_for_function("document.querySelectorAll('.bar.routed').length === 2", timeout=30_000)
            peers = await page.eval_on_selector_all(".bar", "bars => bars.map(b => b.dataset.peer)")
            assert sorted(peers) == sorted(gateway.peer_ids)
            assert await page.locator(".block.hole").count() == 0
            await page.screenshot(path=str(ARTIFACTS / "playground-answer.png"), full_page=True)

            # a long generation stopped from the page: the gateway counts it cancelled
            before = cancelled(gateway)
            await page.fill("#max_tokens", "400")
            await page.fill("#input", "Write a very long story about a lighthouse.")
            await page.press("#input", "Enter")
            await page.wait_for_function("document.querySelectorAll('.msg.assistant')[1].textContent.length > 20",
                                         timeout=120_000)
            await page.click("#stop")
            await page.wait_for_function(
                "document.querySelectorAll('.msg.assistant')[1].textContent.endsWith('[stopped]')")
            for _ in range(100):
                if cancelled(gateway) > before:
                    break
                await page.wait_for_timeout(100)
            assert cancelled(gateway) == before + 1

            # a peer killed: its blocks become a hole on the map
            gateway.peer_procs[1].stop()
            await page.wait_for_function("document.querySelectorAll('.block.hole').length === 15", timeout=90_000)
            assert "holes 15:30" in await page.text_content("#mapinfo")
            await page.screenshot(path=str(ARTIFACTS / "playground-hole.png"), full_page=True)
        finally:
            await browser.close()
