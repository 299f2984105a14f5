"""The shape of the house: imports that point one way (no cycle, `kernels/` a leaf, `model/` below the passes
and the API, `export/` importing no checkpoint or API verb), a root that holds only the verbs, one attribute of
ours on a user's model, a lean `import amole_compile`, and a public API documented and typed."""

from __future__ import annotations

import ast
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import amole_compile as ac

PKG = Path(ac.__file__).resolve().parent
HEAVY = ("triton", "onnx", "onnxscript", "onnxruntime", "onnxruntime_genai", "matplotlib", "trl", "bitsandbytes",
         "torchao")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, at any depth (function-level imports included)."""
    graph: dict[str, set[str]] = {}
    for mod, path in MODULES.items():
        is_pkg = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node)
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
            else:
                continue
            edges |= {n for n in names if n in MODULES and n != mod}
        graph[mod] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 20
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_cycle_detector_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_kernels_is_a_leaf():
    graph = import_graph()
    for mod, edges in graph.items():
        if mod.startswith("amole_compile.kernels"):
            outside = sorted(e for e in edges if not e.startswith("amole_compile.kernels"))
            assert not outside, f"{mod} imports {outside}"


def _importers(prefix: str) -> dict[str, set[str]]:
    return {m: e for m, e in import_graph().items() if m == prefix or m.startswith(prefix + ".")}


def _hits(edges: set[str], banned: tuple[str, ...]) -> list[str]:
    return sorted(e for e in edges if any(e == b or e.startswith(b + ".") for b in banned))


VERBS = ("amole_compile.core", "amole_compile.checkpoint.io", "amole_compile.stats")  # the API's verb modules


def test_export_imports_no_checkpoint_api_or_cli():
    banned = ("amole_compile.checkpoint", "amole_compile.cli", "amole_compile.integrations.patches",
              "amole_compile.integrations.trainer") + VERBS
    for mod, edges in _importers("amole_compile.export").items():
        assert not _hits(edges, banned) and "amole_compile" not in edges, (mod, _hits(edges, banned))


def test_model_state_sits_below_passes_and_api():
    allowed = ("amole_compile.model", "amole_compile.config", "amole_compile.files", "amole_compile.kernels",
               "amole_compile.passes.targets")  # the plan's data types
    for mod, edges in _importers("amole_compile.model").items():
        assert not [e for e in edges if not _hits({e}, allowed)], (mod, edges)


def test_only_the_api_imports_the_verbs():
    api = VERBS + ("amole_compile", "amole_compile.cli")
    for mod, edges in import_graph().items():
        if mod not in api and not mod.startswith("amole_compile.cli."):
            assert not _hits(edges, VERBS + ("amole_compile.cli",)), (mod, _hits(edges, VERBS))


def test_the_root_holds_the_verbs_and_shared_leaves_only():
    root = sorted(p.name for p in PKG.glob("*.py"))
    assert root == ["__init__.py", "config.py", "core.py", "files.py", "folders.py", "stats.py"], root
    subpackages = sorted(p.name for p in PKG.iterdir() if (p / "__init__.py").is_file())
    assert subpackages == ["checkpoint", "cli", "export", "integrations", "kernels", "model", "passes"]


def test_one_attribute_of_ours_on_a_users_model():
    """No module of the package names an `_amole...` attribute but the record's and the graph path's holder."""
    import re

    found = set()
    for path in MODULES.values():
        found |= set(re.findall(r"[\"'](_amole\w*)[\"']", path.read_text()))
    assert found <= {"_amole_state", "_amole"}, found


def test_retired_names_warn_and_are_not_public():
    for name in ("compute_loss", "AdaMoLETrainer", "atomic_write"):
        assert name not in ac.__all__
        with pytest.warns(DeprecationWarning, match="retired"):
            assert callable(getattr(ac, name))


def test_passes_and_export_never_import_each_other():
    for mod, edges in import_graph().items():
        for a, b in (("passes", "export"), ("export", "passes")):
            if mod.startswith(f"amole_compile.{a}"):
                assert not any(e.startswith(f"amole_compile.{b}") for e in edges), (mod, edges)


def test_lean_import():
    code = ("import sys, json, torch; before = set(sys.modules); import amole_compile; "
            "new = set(sys.modules) - before; "
            "print(json.dumps({'new': sorted(new), 'cuda': torch.cuda.is_initialized()}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    heavy = sorted(m for m in data["new"] if m.split(".")[0] in HEAVY or m.startswith("torch._inductor"))
    assert heavy == [], heavy
    assert data["cuda"] is False


def test_op_registers_on_first_use():
    code = ("import torch, amole_compile as ac; assert not hasattr(torch.ops.amole, 'adapter'); "
            "m = ac.transform(torch.nn.Sequential(), None) if False else None; "
            "from amole_compile.kernels import register; register(); "
            "assert torch.ops.amole.adapter.default is not None; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_errors_importable_from_the_package():
    for name in ("CaptureError", "NoAttentionFound", "UnsupportedLayerError", "OnnxExportError"):
        exc = getattr(ac, name)
        assert issubclass(exc, Exception), name


def _public_api():
    for name in ac.__all__:
        yield name, getattr(ac, name)


@pytest.mark.parametrize("name,obj", list(_public_api()), ids=[n for n, _ in _public_api()])
def test_public_api_documented_and_typed(name, obj):
    assert inspect.getdoc(obj), f"{name} has no docstring"
    if inspect.isfunction(obj):
        sig = inspect.signature(obj)
        missing = [p.name for p in sig.parameters.values()
                   if p.annotation is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        assert not missing, f"{name}: parameters without type hints: {missing}"
        assert sig.return_annotation is not inspect.Signature.empty, f"{name}: no return type hint"
    if inspect.isclass(obj):
        for attr, member in vars(obj).items():
            if not attr.startswith("_") and inspect.isfunction(member):
                assert inspect.getdoc(member), f"{name}.{attr} has no docstring"


def _public_defs(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            yield node


def test_every_public_definition_has_a_docstring():
    """Public functions and classes of every module (and public methods of public classes) have docstrings;
    Triton device functions are documented by their file's legend."""
    missing = []
    for mod, path in MODULES.items():
        if mod.split(".")[-1].startswith("_") and not path.name == "__init__.py":
            continue  # a private module
        for node in _public_defs(ast.parse(path.read_text())):
            jit = any("jit" in ast.unparse(d) for d in getattr(node, "decorator_list", []))
            if not jit and ast.get_docstring(node) is None:
                missing.append(f"{mod}.{node.name}")
            if isinstance(node, ast.ClassDef):
                for sub in node.body:
                    if isinstance(sub, ast.FunctionDef) and not sub.name.startswith("_") \
                            and ast.get_docstring(sub) is None:
                        missing.append(f"{mod}.{node.name}.{sub.name}")
    assert not missing, missing


def test_plan_is_readable_filterable_and_drives_transform():
    from models import build, ids, logits

    model = build("llama")
    plan = ac.plan(model, ac.AdaMoLEConfig())
    assert "q_proj" in plan.describe() and plan.model == type(model).__name__
    only_v = plan.filter(roles=("v",), modules=lambda m: ".0." in m)
    assert [(t.module, t.roles) for t in only_v.targets] == [("model.layers.0.self_attn.v_proj", ("v",))]
    x = ids()
    ref = logits(model, x)
    ac.transform(model, ac.AdaMoLEConfig(), plan=only_v)
    assert [t.module for t in ac.targets(model)] == ["model.layers.0.self_attn.v_proj"]
    assert torch.equal(logits(model, x), ref)


def test_rewrite_reports_what_it_rewrote():
    from models import build

    model = build("llama")
    report = ac.core.rewrite(model, ac.plan(model, ac.AdaMoLEConfig()).targets, ac.AdaMoLEConfig())
    assert report.rewritten == 8 and report.matched == 8


def test_plan_for_another_model_is_refused():
    from models import build

    plan = ac.plan(build("llama"), ac.AdaMoLEConfig())
    other = build("gpt2")
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="does not have"):
        ac.transform(other, ac.AdaMoLEConfig(), plan=plan)
    assert not ac.is_transformed(other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_bench_without_a_checkout_says_so_in_one_line(monkeypatch, tmp_path, capsys):
    from amole_compile import cli
    from amole_compile.cli import commands

    fake = tmp_path / "site-packages" / "amole_compile" / "cli" / "commands.py"
    monkeypatch.setattr(commands, "__file__", str(fake))
    assert cli.main(["bench", "layer"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "source checkout" in err[0], err


def _session_scoped(decorator: ast.expr) -> bool:
    return isinstance(decorator, ast.Call) and any(
        k.arg == "scope" and isinstance(k.value, ast.Constant) and k.value.value == "session"
        for k in decorator.keywords)


def test_each_session_fixture_is_built_on_one_worker():
    """The test files using a conftest's session-scoped fixture are one file or one group of tests/conftest.py's
    SHARED_FIXTURE_GROUPS (pytest-xdist runs a group on one worker): else each worker running one of them builds
    the fixture again (an ONNX export pair: 20-45 s)."""
    tests = Path(__file__).resolve().parent
    root_conftest = ast.parse((tests / "conftest.py").read_text())
    groups = next(ast.literal_eval(n.value) for n in root_conftest.body if isinstance(n, ast.Assign)
                  and any(getattr(t, "id", None) == "SHARED_FIXTURE_GROUPS" for t in n.targets))
    files = {f.relative_to(tests.parent).as_posix(): f.read_text() for f in tests.rglob("test_*.py")  # as node ids
             if f != Path(__file__).resolve()}
    fixtures = [fn.name for cf in tests.rglob("conftest.py") for fn in ast.parse(cf.read_text()).body
                if isinstance(fn, ast.FunctionDef) and any(map(_session_scoped, fn.decorator_list))]
    assert "llama_adamole" in fixtures  # the check sees them
    for name in fixtures:
        users = sorted(path for path, text in files.items() if re.search(rf"\b{name}\b", text))
        assert len({groups.get(u, u) for u in users}) <= 1, (
            f"session fixture {name!r} is used by {users} on different workers: put them in one group of "
            "SHARED_FIXTURE_GROUPS (tests/conftest.py)")
