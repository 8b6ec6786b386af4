"""Layers that hold: training never imports export. Every hiad_train module but its CLI (which composes
commands and may call into hiad_export inside one: `calibrate` on a bundle, `update`) is proven free of
hiad_export twice: by a scan of every import statement, function-level ones included, and by a fresh
interpreter that refuses hiad_export and still imports every module, trains, checkpoints, calibrates and
updates."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import hiad_train

ROOT = Path(hiad_train.__file__).parent
MODULES = sorted(
    ".".join(("hiad_train", *p.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
    for p in ROOT.rglob("*.py")
    if p != ROOT / "cli.py"
)


def _imported(tree: ast.AST) -> list[str]:
    """Module names of every import statement and of every importlib.import_module / __import__ with a literal."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names.append(node.args[0].value)
    return names


def test_no_training_module_imports_hiad_export():
    offenders = [
        f"{p.relative_to(ROOT.parent)}: {name}"
        for p in sorted(ROOT.rglob("*.py"))
        if p != ROOT / "cli.py"
        for name in _imported(ast.parse(p.read_text(), str(p)))
        if name.split(".")[0] == "hiad_export"
    ]
    assert offenders == []


def test_training_checkpoints_calibration_and_update_run_with_hiad_export_blocked(elpv_root, tmp_path):
    script = textwrap.dedent(
        f"""
        import importlib, sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] == 'hiad_export':
                    raise ImportError('blocked: ' + name)
        sys.meta_path.insert(0, Block())
        for name in {MODULES!r}:
            importlib.import_module(name)
        from pathlib import Path
        from hiad_runtime.image import load_image
        from hiad_train import calibration
        from hiad_train.checkpoint import load_checkpoint, save_checkpoint
        from hiad_train.config import parse_config
        from hiad_train.data import read_mvtec
        from hiad_train.trainer import HRTrainer
        config = parse_config({{"image_size": 256, "patch_size": 128, "tasks": {{"generator": "o2o"}},
                               "patch": {{"percentage": 0.1, "target_embed_dimension": 32}},
                               "thumbnail": {{"thumbnail_size": 128, "percentage": 0.1, "target_embed_dimension": 32}},
                               "val_config": {{"val_sample_ratio": 0.25}}}})
        samples = read_mvtec({str(elpv_root)!r}, "train")
        trained = HRTrainer(config, progress=False).fit(samples)
        model = load_checkpoint(save_checkpoint(trained, {str(tmp_path / "ckpt")!r}))
        normal = [load_image(s.image_path) for s in samples[:2]]
        synthesizer = config.val_config.anomaly_syn_fn.build()
        cal = calibration.calibrate(calibration.model_scorer(model), normal, [], synthesizer, 0.05)
        calibration.write_checkpoint(Path({str(tmp_path / "ckpt")!r}).resolve(), {str(tmp_path / "calibrated")!r}, cal)
        from hiad_train.update import update_model
        update_model(model, normal, progress=False)
        assert not [m for m in sys.modules if m.split('.')[0] == 'hiad_export'], 'hiad_export was imported'
        print('TASKS', len(load_checkpoint({str(tmp_path / "calibrated")!r}).tasks))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TASKS 4" in out.stdout
