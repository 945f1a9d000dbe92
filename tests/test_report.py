"""report.html is self-contained and holds the tables."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from atpstar import Attribution, Cost
from atpstar.evaluate import evaluate
from atpstar.report import write_report


def _result(method: str, seed: int, aggregation: str = "mean_abs") -> Attribution:
    gen = torch.Generator().manual_seed(seed)
    per_pair = {"head": torch.randn(2, 2, 3, 4, generator=gen)}
    scores = {t: v.mean(0) if aggregation == "mean" else v.abs().mean(0) for t, v in per_pair.items()}
    return Attribution(method, {"samples": 8}, "noising", "logit_diff", "tiny-model", per_pair, scores, aggregation,
                       Cost(4, 2), info={"seq_len": 4, "atpstar_version": "0"})


def test_report_contains_tables_images_and_bound(tmp_path) -> None:
    truth, estimate = _result("activation_patching", 0, "mean"), _result("atp*", 1)
    top = estimate.top(3)
    verified = SimpleNamespace(nodes=[(n.node_type, n.index) for n in top], effects=torch.tensor([[1.0, 2], [-3, 0], [0.5, 0.5]]),
                               cost=Cost(6, 0))
    bound = SimpleNamespace(max_effect_upper=0.25, prob_upper=0.01, theta=0.5, assumption="effects are additive <b>",
                            upper={"head": torch.zeros(2, 3, 4)})
    png = tmp_path / "img.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    ev = evaluate(truth, [estimate], setting="per_pair")
    path = write_report(tmp_path / "out" / "report.html", [estimate], task="ioi <2 pairs>", verified=verified, bound=bound,
                        evaluations=[ev], images=[("a plot", png)], top=5, prompts=[("clean text", "noise text")],
                        facts={"wall time": "1 s"})
    html = path.read_text()
    assert html.startswith("<!DOCTYPE html>") and "<style>" in html
    assert "src='data:image/png;base64," in html and "http" not in html.replace("http-equiv", "")
    assert top[0].name in html and "verified effect (mean)" in html and "1.5" in html  # mean of [1, 2]
    assert "tiny-model" in html and "noising" in html and "logit_diff" in html and "ioi &lt;2 pairs&gt;" in html
    assert "max_effect_upper" in html and "effects are additive &lt;b&gt;" in html
    assert "Cost of verified recall" in html and "cost@1" in html
    assert "forward equivalents" in html and "8.0" in html  # atp* cost: 4 + 2 * 2
