"""The layers hold: every module's imports, read with ast (nothing is imported), against the rule

    format  <-  network  <-  runtime  <-  convert, export  <-  serve  <-  cli
    network: the torch modules, the PyramidDrop rule, the kernels' binding; never the engine over time
    runtime: the engine over time (load, scheduler, paged KV, prefix cache, decode runners, sampling)
    client: format only, no torch         fidelity: format, network, runtime, convert, export
    the Triton model: only `builder`'s public API (builder.__all__)

and, run for real in a subprocess, that a client loads no torch and a loaded engine no build code.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import builder

ROOT = Path(__file__).resolve().parents[1]
# layer -> the layers (of builder.*) its modules may import
ALLOWED = {
    "format": {"format"},
    "network": {"format", "network"},
    "runtime": {"format", "network", "runtime"},
    "convert": {"format", "network", "runtime", "convert", "export"},
    "export": {"format", "network", "runtime", "convert", "export"},
    "serve": {"format", "network", "runtime", "serve"},
    "client": {"format", "client"},
    "frontend": {"format", "client", "frontend"},
    "fidelity": {"format", "network", "runtime", "convert", "export", "fidelity"},
    "cli": {"api", "format", "network", "runtime", "convert", "export", "serve", "frontend", "cli"},
    "api": {"api", "format"},  # builder/__init__.py: the rest of the API is loaded lazily (checked below)
}
# third-party packages a layer may not import
BANNED = {"format": {"torch", "transformers", "safetensors", "tqdm"}, "client": {"torch", "transformers", "safetensors"}}
# scripts that are clients of a server: they never load the runtime or torch
CLIENT_SCRIPTS = ["scripts/bench_grpc.py", "scripts/make_pa_input.py", "scripts/soak_grpc.py"]
TRITON_MODEL = "triton_repo/pdrop/1/model.py"
# what a client script may use to package and start a server of its own (neither loads the runtime)
SERVER_TOOLS = ("builder.serve.launcher", "builder.serve.package")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, module: str, is_package: bool) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, names) of every import statement, relative ones resolved."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.append((node.lineno, target, [alias.name for alias in node.names]))
    return found


def layer(module: str) -> str | None:
    """The layer of a builder module ('api' for the package itself), None outside builder."""
    parts = module.split(".")
    if parts[0] != "builder":
        return None
    if len(parts) == 1:
        return "api"
    return "cli" if parts[1] in ("cli", "__main__") else parts[1]


def violations(path: str, source: str, own: str | None = None) -> list[str]:
    """Every forbidden edge of one file, named: 'builder/runtime/engine.py:23 imports builder.convert.build
    (runtime -> convert)'. `own` is the file's layer for files outside builder (scripts, the Triton model)."""
    file = ROOT / path
    module = module_name(file)
    own = own or layer(module)
    found = []
    for line, target, names in imports(source, module, file.name == "__init__.py"):
        where = f"{path}:{line} imports {target}"
        top = target.split(".")[0]
        if own == "triton-model":
            if target != "builder" and top == "builder" or any(n not in builder.__all__ for n in names if target == "builder"):
                found.append(f"{where} {names} (the Triton model uses only builder's public API)")
            continue
        if own == "client-script":
            if layer(target) not in (None, "client", "format") and target not in SERVER_TOOLS or top == "torch":
                found.append(f"{where} (a client script loads no runtime and no torch)")
            continue
        if top in BANNED.get(own, ()):
            found.append(f"{where} ({own} -> {top})")
        target_layer = layer(target)
        # `from builder.network import pyramid` names a module of that package
        if target_layer is not None and target_layer not in ALLOWED[own]:
            found.append(f"{where} ({own} -> {target_layer})")
    return found


def sources() -> list[tuple[str, str | None]]:
    files = [(p.relative_to(ROOT).as_posix(), None) for p in sorted((ROOT / "builder").rglob("*.py"))]
    return files + [(s, "client-script") for s in CLIENT_SCRIPTS] + [(TRITON_MODEL, "triton-model")]


def test_no_module_imports_across_the_layers():
    found = [v for path, own in sources() for v in violations(path, (ROOT / path).read_text(), own)]
    assert not found, "forbidden imports:\n" + "\n".join(found)


def test_every_builder_module_belongs_to_a_layer():
    for path, own in sources():
        assert (own or layer(module_name(ROOT / path))) in {*ALLOWED, "client-script", "triton-model"}, path


@pytest.mark.parametrize("path,source,edge", [
    ("builder/runtime/engine.py", "from ..convert.build import build_engine\n", "(runtime -> convert)"),
    ("builder/network/model.py", "from builder.fidelity import train\n", "(network -> fidelity)"),
    ("builder/network/model.py", "from ..runtime.paged_kv import BlockPool\n", "(network -> runtime)"),
    ("builder/network/attention.py", "from builder.runtime import scheduler\n", "(network -> runtime)"),
    ("builder/network/vision.py", "from ..serve.protocol import parse_request\n", "(network -> serve)"),
    ("builder/network/vision.py", "from ..export import vision_onnx\n", "(network -> export)"),
    ("builder/runtime/scheduler.py", "from ..serve.protocol import parse_request\n", "(runtime -> serve)"),
    ("builder/format/config.py", "import torch\n", "(format -> torch)"),
    ("builder/format/manifest.py", "from ..network.rope import Rope\n", "(format -> network)"),
    ("builder/client/grpc.py", "import torch.nn\n", "(client -> torch)"),
    ("builder/client/grpc.py", "from ..network.images import load_image\n", "(client -> network)"),
    ("builder/serve/protocol.py", "from ..fidelity.task import render\n", "(serve -> fidelity)"),
    (TRITON_MODEL, "from builder.runtime.engine import Engine\n", "public API"),
    (TRITON_MODEL, "from builder import Engine, _LAZY\n", "public API"),
    ("scripts/bench_grpc.py", "from builder.format.manifest import read_manifest\nimport torch\n", "no torch"),
    ("scripts/bench_grpc.py", "from builder.runtime.engine import Engine\n", "no runtime"),
])
def test_the_check_names_each_forbidden_edge(path, source, edge):
    """The checker itself: one planted import of each forbidden kind is caught and named."""
    own = {TRITON_MODEL: "triton-model", "scripts/bench_grpc.py": "client-script"}.get(path)
    [found] = violations(path, source, own)
    assert found.startswith(f"{path}:") and edge in found


def test_the_public_api_loads_lazily_from_allowed_layers():
    assert {layer(f"builder.{m}") for m in builder._LAZY.values()} <= {"network", "runtime", "format", "serve"}
    assert all(hasattr(builder, name) for name in builder.__all__)


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_client_loads_no_torch_and_no_runtime():
    loaded = run_python("import sys, builder.client.grpc; "
                        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('builder.runtime', "
                        "'builder.network'))))")
    assert loaded == "[]"


def test_loading_an_engine_loads_no_build_serve_or_training_code(engine_dir):
    loaded = run_python(f"import sys; from builder import Engine; Engine.load({str(engine_dir)!r}, device='cpu'); "
                        "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('builder.')}))")
    assert loaded == "['format', 'network', 'runtime']"


def test_the_plugins_include_no_torch():
    """plugins/ is C++/CUDA over a C ABI: a TensorRT plugin or any C caller can link it without torch."""
    sources = [p for p in (ROOT / "plugins").rglob("*") if p.suffix in (".h", ".cu", ".cuh", ".cpp")]
    assert len(sources) >= 4
    for path in sources:
        includes = re.findall(r"^\s*#\s*include\s*[<\"]([^>\"]+)", path.read_text(), flags=re.M)
        assert not [i for i in includes if i.startswith(("torch", "ATen", "c10", "pybind11", "Python"))], path
