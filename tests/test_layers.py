"""The tree is the architecture: the method core (hncl/core) is plain PyTorch and never reaches
into the infrastructure (S3, Ray, temp files, preflight), training, evaluation or the commands;
every worker function runs through one launch path."""

import ast
import pathlib
import subprocess
import sys

HNCL = pathlib.Path(__file__).resolve().parent.parent / "hncl"
CORE_MAY_NOT_IMPORT = ("ray", "s3fs", "fsspec", "botocore", "aiobotocore", "boto3", "pyarrow", "webdataset",
                       "hncl.infra", "hncl.train", "hncl.evaluate", "hncl.commands", "hncl.cli", "hncl.data.shards")


def _imports(path: pathlib.Path):
    """(line, module) of every import in the file, at any depth (function-level imports too)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            yield node.lineno, base
            yield from ((node.lineno, f"{base}.{a.name}") for a in node.names)  # `from hncl import infra`


def test_the_core_imports_nothing_of_ray_s3_or_the_layers_above_it():
    bad = [f"{p.relative_to(HNCL.parent)}:{line} imports {mod}"
           for p in sorted((HNCL / "core").rglob("*.py")) for line, mod in _imports(p)
           if any(mod == f or mod.startswith(f + ".") for f in CORE_MAY_NOT_IMPORT)]
    assert not bad, bad
    # and at run time: importing every core module (and building a method) loads none of them
    modules = sorted(".".join(p.relative_to(HNCL.parent).with_suffix("").parts).removesuffix(".__init__")
                     for p in (HNCL / "core").rglob("*.py"))
    script = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
              "from hncl.config import load_config\nfrom hncl.core.model import HNCLModel\n"
              "from hncl.core.methods import build_method\nimport torch\n"
              "cfg = load_config(None, ['model.width=8', 'method.queue_size=16', 'descriptor.dim=8'])\n"
              "build_method(cfg, HNCLModel('resnet18', 8, proj_hidden=16, proj_out=8, pred_hidden=16), torch.device('cpu'))\n"
              f"print(sorted(m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in {CORE_MAY_NOT_IMPORT!r})))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_every_worker_function_runs_through_the_one_launch_path():
    """Workers get their config from hncl.train.launch.worker_config and run through launch();
    nothing else builds the {"cfg", "session"} wrapper or calls Ray Train's trainer."""
    root = HNCL.parent
    offenders = []
    for p in sorted([*root.glob("hncl/**/*.py"), *root.glob("benchmarks/*.py"), *root.glob("cluster/*.py")]):
        if p == root / "hncl" / "train" / "launch.py":
            continue
        text = p.read_text()
        if '"session": "local"' in text or '"session": "ray"' in text or "TorchTrainer(" in text:
            offenders.append(str(p.relative_to(root)))
    assert not offenders, offenders
