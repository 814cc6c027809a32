"""Default JAX to the CPU on machines with no accelerator (make installs this into its venvs).

`make` copies this file into the virtual environment's site-packages as `_rt_jax_cpu_default.py`
with a `.pth` line that imports it at interpreter start-up. libtpu is installed there for
ahead-of-time TPU compiles; without a TPU it would print initialisation errors the first time JAX
looks for devices. On a machine that has no TPU and no GPU device this sets `JAX_PLATFORMS=cpu`
(the only platform there anyway); an explicit `JAX_PLATFORMS`, a TPU VM and a GPU machine are left
as they are. Standard library only: it runs before anything else is imported.
"""

import glob
import os
from collections.abc import MutableMapping

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips show up as PCI devices of this vendor


def accelerator_present(root: str = "/") -> bool:
    """Whether a TPU (Google PCI device, /dev/accel*, /dev/vfio/N) or a GPU device node exists."""

    def found(pattern: str) -> bool:
        return bool(glob.glob(os.path.join(root, pattern)))

    for vendor_file in glob.glob(os.path.join(root, "sys/bus/pci/devices/*/vendor")):
        try:
            with open(vendor_file) as f:
                if f.read().strip().lower() == GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    patterns = ("dev/accel*", "dev/vfio/[0-9]*", "dev/nvidia[0-9]*", "dev/kfd")
    return any(found(p) for p in patterns)


def apply(environ: MutableMapping[str, str] | None = None, root: str = "/") -> None:
    """Set JAX_PLATFORMS=cpu in `environ` when it is unset and no accelerator is present."""
    environ = os.environ if environ is None else environ
    if "JAX_PLATFORMS" not in environ and not accelerator_present(root):
        environ["JAX_PLATFORMS"] = "cpu"


apply()
