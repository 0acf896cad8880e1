"""pd_core.metrics and pd_core.images as a whole: importing them loads no orchestration (Prefect, MLflow) and no
torchvision."""

from __future__ import annotations

import subprocess
import sys


def test_metrics_never_import_prefect_or_mlflow():
    code = ("import sys, pd_core.metrics, pd_core.images; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow', 'torchvision')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
