"""export/ is a layer below the API: it never imports the verbs (core, checkpoint, stats, cli) or the package root,
and genai.py runs the shared pipeline directly (no callback from onnx.py)."""

from __future__ import annotations

from test_house import import_graph

FORBIDDEN = ("amole_compile.core", "amole_compile.checkpoint", "amole_compile.stats", "amole_compile.cli")


def test_export_imports_no_api():
    for mod, edges in import_graph().items():
        if mod.startswith("amole_compile.export"):
            bad = sorted(e for e in edges if e == "amole_compile" or e.startswith(FORBIDDEN))
            assert not bad, f"{mod} imports {bad}"


def test_genai_runs_the_pipeline_itself():
    graph = import_graph()
    assert "amole_compile.export._pipeline" in graph["amole_compile.export.genai"]
    assert "amole_compile.export.onnx" not in graph["amole_compile.export.genai"]
