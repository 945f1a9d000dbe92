"""report.html in a real Chromium: loads without console errors and offline, draws each circuit's edges at
every slider position, shows a clicked node's name and score, sorts and filters tables, and shows a
heatmap cell's strongest node on hover."""

from __future__ import annotations

import json

import pytest
from chromium_driver import start_chromium

from atpstar.edges.circuits import FaithfulnessCurve

pytestmark = pytest.mark.browser


def _open(driver, path):
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(path.as_uri())
    WebDriverWait(driver, 10).until(lambda d: d.find_element("tag name", "body").get_attribute("data-viewer") == "ready")
    return driver


def _graph_data(driver, graph):
    source = graph.get_attribute("data-source")
    return json.loads(driver.execute_script(f"return document.getElementById('{source}').textContent"))


def _errors(driver):
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


@pytest.mark.parametrize("name", ["circuit", "edges", "nodes"])
def test_page_loads_without_console_errors(chromium, reports, name):
    driver = _open(chromium, reports[name])
    assert _errors(driver) == []
    assert driver.find_elements("css selector", ".atp-graph") or driver.find_elements("css selector", ".atp-heatmaps")


def test_drawn_edges_are_the_circuits_at_every_slider_position(chromium, reports):
    from selenium.webdriver.common.keys import Keys

    driver = _open(chromium, reports["circuit"])
    graphs = driver.find_elements("css selector", ".atp-graph")
    assert len(graphs) == 2  # atp, atp*
    for graph, file in zip(graphs, ("atp", "atp_star")):
        curve = FaithfulnessCurve.load(reports["circuit"].parent / f"{file}.faithfulness.json")
        slider = graph.find_element("css selector", "input.atp-size")
        slider.send_keys(Keys.HOME)
        for position, n_edges in enumerate(curve.n_edges):
            assert slider.get_attribute("value") == str(position)
            drawn = graph.find_elements("css selector", "path.edge")
            assert len(drawn) == n_edges, (file, position)
            label = graph.find_element("css selector", ".atp-size-label").text
            assert f"{n_edges} edges" in label and "faithfulness f = " in label
            slider.send_keys(Keys.ARROW_RIGHT)
    assert _errors(driver) == []


def test_a_click_on_a_node_or_an_edge_shows_its_name_score_and_exact_effect(chromium, reports):
    driver = _open(chromium, reports["edges"])
    graph = driver.find_element("css selector", ".atp-graph")
    data = _graph_data(driver, graph)
    node_element = graph.find_element("css selector", "g.node:not(.idle) circle")
    node = data["nodes"][int(node_element.find_element("xpath", "..").get_attribute("data-node"))]
    node_element.click()
    details = graph.find_element("css selector", ".atp-details")
    assert details.find_element("css selector", ".name").text == node["name"]
    assert float(details.find_element("css selector", ".score").get_attribute("data-value")) == pytest.approx(node["score"])
    verified = [i for i, e in enumerate(data["edges"]) if "exact" in e]
    assert verified, "run --verify 12 verifies edges"
    edge = graph.find_element("css selector", f"path.edge[data-edge='{verified[0]}']")
    driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", edge)
    assert details.find_element("css selector", ".name").text == data["edges"][verified[0]]["name"]
    exact = details.find_element("css selector", ".exact").get_attribute("data-value")
    assert float(exact) == pytest.approx(data["edges"][verified[0]]["exact"])


def test_the_page_opens_with_the_network_disabled_and_requests_nothing(reports):
    driver = start_chromium(offline=True, performance_log=True)
    try:
        for path in reports.values():
            _open(driver, path)
            assert _errors(driver) == []
            assert driver.find_elements("css selector", "path.edge, rect.cell")
        requests = [
            json.loads(entry["message"])["message"]["params"]["request"]["url"]
            for entry in driver.get_log("performance")
            if '"Network.requestWillBeSent"' in entry["message"]
        ]
        assert requests and all(url.startswith(("file:", "data:")) for url in requests), requests
    finally:
        driver.quit()


def _column(table, col):
    return [row.find_elements("css selector", "td")[col].text for row in table.find_elements("css selector", "tr")[1:]
            if row.is_displayed()]


def test_node_tables_sort_and_filter(chromium, reports):
    from selenium.webdriver.common.keys import Keys

    driver = _open(chromium, reports["nodes"])
    table = driver.find_element("xpath", "//h2[starts-with(., 'Top ')]/following::table[1]")
    headers = table.find_elements("css selector", "th")
    score = [h.text for h in headers].index("score")
    headers[score].click()
    ascending = [float(v) for v in _column(table, score)]
    assert ascending == sorted(ascending) and headers[score].get_attribute("aria-sort") == "ascending"
    headers[score].click()
    assert [float(v) for v in _column(table, score)] == sorted(ascending, reverse=True)
    every = _column(table, 1)
    search = table.find_element("xpath", "preceding::input[@class='atp-filter'][1]")
    search.send_keys("hook_v")
    shown = _column(table, 1)
    assert shown and len(shown) < len(every) and all("hook_v" in name for name in shown)
    assert len(shown) == sum("hook_v" in name for name in every)
    search.send_keys(Keys.CONTROL, "a")
    search.send_keys(Keys.BACKSPACE)  # an empty query shows every row again
    assert len(_column(table, 1)) == len(every)


def test_heatmap_hover_shows_the_cells_strongest_node(chromium, reports):
    from selenium.webdriver.common.action_chains import ActionChains

    driver = _open(chromium, reports["nodes"])
    box = driver.find_element("css selector", ".atp-heatmaps")
    maps = _graph_data(driver, box)
    assert {m["node_type"] for m in maps} >= {"head", "neuron"}
    first = box.find_element("css selector", ".atp-heatmap[data-map='0']")
    for row, col in ((0, 0), (1, 2)):
        cell = first.find_element("css selector", f"rect.cell[data-row='{row}'][data-col='{col}']")
        ActionChains(driver).move_to_element(cell).perform()
        tip = driver.find_element("css selector", ".atp-tip")
        assert tip.is_displayed()
        name, score, _ = maps[0]["top"][row][col]
        assert tip.find_element("css selector", ".name").text == name
        assert float(tip.find_element("css selector", ".score").get_attribute("data-value")) == pytest.approx(score)
        assert float(tip.find_element("css selector", ".total").get_attribute("data-value")) == pytest.approx(
            maps[0]["values"][row][col]
        )


def test_a_feature_circuit_graph_draws_and_names_its_latents(chromium, tmp_path):
    from atpstar.report import write_report

    hooks = {0: "blocks.0.hook_resid_post", 1: "blocks.1.hook_resid_post"}
    nodes = [
        {"id": f"{hooks[layer]}/sae[latent {i}, pos 4]", "dictionary": f"sae-{layer}", "hook": hooks[layer],
         "layer": layer, "index": i, "position": 4, "score": 0.5 - 0.1 * i}
        for layer in (0, 1) for i in range(3)
    ]  # fmt: skip
    nodes.append({"id": "metric", "dictionary": None, "layer": None, "index": None, "position": None, "score": 1.5})
    edges = [{"source": nodes[u]["id"], "target": nodes[3 + d]["id"], "weight": 0.3 * (u - d) + 0.05} for u in range(3)
             for d in range(3)] + [{"source": nodes[3 + d]["id"], "target": "metric", "weight": 0.2 + d} for d in range(3)]
    page = write_report(tmp_path / "features.html", [], graphs=[{"title": "feature circuit", "nodes": nodes, "edges": edges}])
    driver = _open(chromium, page)
    graph = driver.find_element("css selector", ".atp-graph")
    slider = graph.find_element("css selector", "input.atp-size")
    from selenium.webdriver.common.keys import Keys

    slider.send_keys(Keys.END)
    assert len(graph.find_elements("css selector", "path.edge")) == len(edges)  # fraction 1: every edge
    assert "output" in [t.text for t in graph.find_elements("css selector", "text.atp-row")]
    metric = graph.find_element("css selector", f"g.node[data-node='{len(nodes) - 1}'] circle")
    driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", metric)
    details = graph.find_element("css selector", ".atp-details")
    assert details.find_element("css selector", ".name").text == "metric"
    assert "3 incoming" in details.text
    assert _errors(driver) == []
