"""flowlib: knowledge distillation of normalizing flows (GLOW, MAF), as a teaching reference.

Modules: ``bijectors`` (invertible layers), ``models`` (Glow, MAF, paper presets), ``distill`` (LKD, ILKD,
SKD losses, Eq. 12-15), ``train`` (one training loop, checkpoints), ``data`` (dataset registry),
``metrics`` / ``fid`` / ``interpolate`` / ``plotting`` (evaluation), ``selfnorm`` (Self Normalizing Flows),
``run`` (``python -m flowlib.run``: executes the notebooks with papermill).
"""

from .models import MAF, Glow, build_model, count_parameters, from_preset

__all__ = ["MAF", "Glow", "build_model", "count_parameters", "from_preset"]
__version__ = "0.1.0"
