"""synthalign-ray: the Synth-Align / PDS-DPO method as a batch system on Ray.

Kept import-light on purpose: the venv's startup hook imports `synthalign_ray._torchvision_compat`
in every Python process (see that module), so nothing heavy may be imported here.
"""

__version__ = "0.1.0"
