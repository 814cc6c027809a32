"""Quiet by default: the console logging of the experiments and the venv's CPU-platform default."""

import logging
import os
import pathlib
import subprocess
import sys

import pytest

from experiments.logs import LOG_FILE, log_to_file, setup_logging

ROOT = pathlib.Path(__file__).resolve().parents[1]
PLATFORM_SCRIPT = ROOT / "scripts" / "cpu_platform_default.py"


@pytest.fixture
def restore_root_logger():
    """Put the root logger's handlers and level back after a test that reconfigures it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for h in root.handlers[:]:
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


@pytest.mark.parametrize("verbose", [False, True])
def test_console_hides_library_info_the_log_file_keeps_it(
    tmp_path, capsys, restore_root_logger, verbose
):
    setup_logging(verbose=verbose)
    with log_to_file(tmp_path / "run") as path:
        logging.getLogger("absl").info("Saving checkpoint at step 10")  # what Orbax logs
        logging.getLogger("grain._src.python.dataset").info("grain detail")
        logging.getLogger("rt_jax.train.loop").info("step 10: val_ce 1.2345")
        logging.getLogger("param_matched").info("training transformer-4L seed 0")
        logging.getLogger("orbax").warning("disk almost full")
    logging.getLogger("absl").info("after the run")  # no run active: not in the file
    err = capsys.readouterr().err
    assert "val_ce 1.2345" in err and "training transformer-4L" in err
    assert "disk almost full" in err  # library warnings stay visible
    assert ("Saving checkpoint" in err) == verbose and ("grain detail" in err) == verbose
    assert path == tmp_path / "run" / LOG_FILE
    text = path.read_text()
    for line in ("Saving checkpoint", "grain detail", "val_ce 1.2345", "disk almost full"):
        assert line in text
    assert "after the run" not in text


def _platform_module():
    namespace: dict = {}
    exec(compile(PLATFORM_SCRIPT.read_text(), str(PLATFORM_SCRIPT), "exec"), namespace)
    return namespace


@pytest.mark.parametrize(
    ("files", "present"),
    [
        ({}, False),
        ({"sys/bus/pci/devices/0000:00:04.0/vendor": "0x1af4\n"}, False),  # virtio: no TPU
        ({"sys/bus/pci/devices/0000:00:05.0/vendor": "0x1ae0\n"}, True),  # Google: a TPU chip
        ({"dev/accel0": ""}, True),
        ({"dev/vfio/0": ""}, True),
        ({"dev/vfio/vfio": ""}, False),  # the vfio control node alone is no device
        ({"dev/nvidia0": ""}, True),
        ({"dev/kfd": ""}, True),
    ],
)
def test_platform_default_only_without_accelerators(tmp_path, files, present):
    ns = _platform_module()
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert ns["accelerator_present"](str(tmp_path)) == present
    env: dict[str, str] = {}
    ns["apply"](env, root=str(tmp_path))
    assert env == ({} if present else {"JAX_PLATFORMS": "cpu"})
    explicit = {"JAX_PLATFORMS": "tpu"}
    ns["apply"](explicit, root=str(tmp_path))
    assert explicit == {"JAX_PLATFORMS": "tpu"}  # an explicit choice always wins


def test_platform_default_silences_libtpu_here():
    """With libtpu installed and no TPU, JAX started after the default prints nothing about TPUs."""
    import libtpu  # noqa: F401  (a test dependency: the case this default is for)

    if _platform_module()["accelerator_present"]():
        pytest.skip("this machine has an accelerator: the default leaves JAX alone here")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    code = (
        f"import runpy; runpy.run_path({str(PLATFORM_SCRIPT)!r}); "
        "import jax; print(jax.devices()[0].platform)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "cpu"
    assert "TPU" not in out.stderr and "libtpu" not in out.stderr, out.stderr
