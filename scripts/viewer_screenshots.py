"""Screenshots of each view of report.html's viewer, taken in headless Chromium, for docs/viewer.md.

Writes reports of toy-ioi results (``atpstar circuit`` and ``atpstar run``; about a minute on a CPU) unless
given, opens them with Selenium and saves:
    viewer-circuit.png   the circuit graph of ``atpstar circuit`` with its size slider, f curve and a clicked node
    viewer-edges.png     ``atpstar run --nodes edge --verify``: verified edges outlined, a clicked edge's exact effect
    viewer-table.png     the top-nodes table sorted by score and filtered
    viewer-heatmap.png   a per-layer heatmap with the hover details of a cell

Usage:
    PYTHONPATH=src python scripts/viewer_screenshots.py [--out docs/figures/viewer] [--work /tmp/viewer]
        [--circuit REPORT] [--edges REPORT] [--nodes REPORT] [--prefix viewer]
(given reports: only their views, e.g. --circuit out/circuit/report.html --prefix viewer-smollm2)

Needs chromium, chromedriver (apt-get install chromium chromium-driver) and selenium (pip).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from atpstar.cli import main as atpstar


def start_chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,2400", "--hide-scrollbars"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver") or "chromedriver"))


def toy_reports(work: Path) -> dict[str, Path]:
    common = ["--model", "toy-ioi", "--task", "ioi", "--no-progress", "--no-plots"]
    runs = {
        "circuit": ["circuit", *common, "--method", "atp,atp*"],
        "edges": ["run", *common, "--nodes", "edge", "--verify", "12"],
        "nodes": ["run", *common, "--verify", "20"],
    }
    for name, args in runs.items():
        if not (work / name / "report.html").exists():
            atpstar([*args, "--out", str(work / name)])
    return {name: work / name / "report.html" for name in runs}


def _open(driver, path: Path) -> None:
    driver.get(path.resolve().as_uri())
    for _ in range(50):
        if driver.find_element("tag name", "body").get_attribute("data-viewer") == "ready":
            return
        time.sleep(0.1)
    raise RuntimeError(f"the viewer did not start on {path}")


def _show(driver, element) -> None:
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    time.sleep(0.2)


def _click(driver, element) -> None:
    driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", element)


def circuit_view(driver, report: Path, out: Path) -> None:
    from selenium.webdriver.common.keys import Keys

    _open(driver, report)
    graph = driver.find_element("css selector", ".atp-graph")
    _show(driver, graph)
    nodes = graph.find_elements("css selector", "g.node:not(.idle)")
    _click(driver, nodes[len(nodes) // 2])
    graph.find_element("css selector", "input.atp-size").send_keys(Keys.ARROW_LEFT)
    _click(driver, graph.find_elements("css selector", "g.node:not(.idle)")[len(nodes) // 2])
    graph.screenshot(str(out))


def edges_view(driver, report: Path, out: Path) -> None:
    _open(driver, report)
    graph = driver.find_element("css selector", ".atp-graph")
    _show(driver, graph)
    verified = graph.find_elements("css selector", "path.atp-halo + path.edge")
    if verified:
        _click(driver, verified[0])
    graph.screenshot(str(out))


def table_view(driver, report: Path, out: Path, query: str = "hook_v") -> None:
    _open(driver, report)
    table = driver.find_element("xpath", "//h2[starts-with(., 'Top ')]/following::table[1]")
    score = [h.text for h in table.find_elements("css selector", "th")].index("score")
    header = table.find_elements("css selector", "th")[score]
    header.click()
    header.click()  # descending
    search = table.find_element("xpath", "preceding::input[@class='atp-filter'][1]")
    search.send_keys(query)
    box = table.find_element("xpath", "..")
    _show(driver, box)
    box.screenshot(str(out))


def heatmap_view(driver, report: Path, out: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    _open(driver, report)
    heatmaps = driver.find_elements("css selector", ".atp-heatmap")
    chosen = next((h for h in heatmaps if "× head" in h.find_element("css selector", "h3").text), heatmaps[0])
    _show(driver, chosen)
    cells = chosen.find_elements("css selector", "rect.cell")
    darkest = min(cells, key=lambda c: sum(int(v) for v in c.get_attribute("fill")[4:-1].split(",")))  # "rgb(r,g,b)"
    ActionChains(driver).move_to_element(darkest).perform()
    time.sleep(0.2)
    chosen.screenshot(str(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/figures/viewer", help="folder of the PNG files")
    parser.add_argument("--work", default="/tmp/atpstar-viewer", help="folder for the toy-ioi reports")
    parser.add_argument("--prefix", default="viewer", help="file name prefix (e.g. viewer-smollm2)")
    for name in ("circuit", "edges", "nodes"):
        parser.add_argument(f"--{name}", type=Path, default=None, help=f"use this report as the {name} report")
    args = parser.parse_args()
    given = {name: getattr(args, name) for name in ("circuit", "edges", "nodes") if getattr(args, name)}
    reports = given or toy_reports(Path(args.work))  # given reports: only their views
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    driver = start_chromium()
    try:
        if "circuit" in reports:
            circuit_view(driver, reports["circuit"], out / f"{args.prefix}-circuit.png")
        if "edges" in reports:
            edges_view(driver, reports["edges"], out / f"{args.prefix}-edges.png")
        if "nodes" in reports:
            table_view(driver, reports["nodes"], out / f"{args.prefix}-table.png")
            heatmap_view(driver, reports["nodes"], out / f"{args.prefix}-heatmap.png")
    finally:
        driver.quit()
    print("\n".join(str(p) for p in sorted(out.glob(f"{args.prefix}-*.png"))))


if __name__ == "__main__":
    main()
