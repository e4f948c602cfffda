"""`ijepa-viz demo --quick`: trains, evaluates, and writes an HTML report with its figures."""
import html
import json

from ijepa_viz.cli import main


def test_demo_quick_writes_report_with_figures(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.html'}" in printed
    page = (out / "report.html").read_text()
    for png in ("masks.png", "loss.png", "embedding.png", "probe.png"):
        assert (out / png).stat().st_size > 1000 and f'src="{png}"' in page
    assert "random init" in page and "raw pixels" in page
    summary = json.loads((out / "demo.json").read_text())
    names = [r["name"] for r in summary["eval"]["rows"]]
    assert names == ["ijepa (target encoder)", "random init", "raw pixels"]
    assert summary["steps"] == 12
    # the report's sentence is computed from the numbers, and the time is split into its phases
    assert html.escape(summary["verdict"]) in page and summary["verdict"].startswith("The trained encoder")
    assert set(summary["seconds"]) == {"train", "eval", "figures", "total"}
    assert "Time: training" in page
    # one computed sentence per map says whether its classes form clusters, one per encoder why (neighbours)
    assert len(summary["clusters"]) == 6 and all("class silhouette" in c for c in summary["clusters"][:4])
    assert all("nearest neighbours share its class" in c for c in summary["clusters"][4:])
    assert all(html.escape(c) in page for c in summary["clusters"])
