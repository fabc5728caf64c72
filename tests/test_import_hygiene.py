"""The library never imports the front ends (typer, rich, textual)."""

import subprocess
import sys


def test_core_does_not_import_the_cli_or_dashboard():
    code = (
        "import sys, tarflow_core, tarflow_core.checkpoint, tarflow_core.sampling, tarflow_core.likelihood, "
        "tarflow_core.data, tarflow_core.tensorboard\n"
        "front_ends = ('typer', 'rich', 'textual', 'click', 'tarflow_cli')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in front_ends)\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_spec_python_api_is_importable_from_the_package():
    import tarflow_core
    from tarflow_core import TarFlow, denoise, load_model, nll
    from tarflow_core.checkpoint import load_model as direct

    assert load_model is direct and callable(nll) and callable(denoise) and hasattr(TarFlow, "sample")
    assert set(tarflow_core.__all__) >= {"load_model", "TarFlow", "nll", "denoise"}


def test_the_tensorboard_exporter_loads_tensorboard_only_when_it_writes():
    """Importing the module costs nothing: tensorboard (the optional extra) loads with a writer."""
    code = "import sys, tarflow_core.tensorboard\nprint('tensorboard' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"
