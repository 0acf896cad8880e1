"""MLflow tracking for the pipeline: runs, params, metrics, artifacts, the sampler model, and a journal.

- :class:`Tracker` (``tracker``) is what tasks call. It talks to MLflow only through
  :class:`mlflow.MlflowClient` with explicit run ids, never raises into training code, and journals
  calls while MLflow is unreachable (``journal``) to replay them in order when it returns; the calls
  themselves are applied by ``ops``.
- Nothing sent to MLflow is trusted to be clean: :func:`redact` and the param/tag cleaning in ``redact``.
- The sampler is logged as an MLflow "models from code" pyfunc (``mlflow_model.py``) with safetensors
  weights and a JSON manifest; :func:`load_sampler_from_mlflow` loads it back without executing logged
  code (``sampler_model``).

- Links into MLflow's UI (the model-training view, artifact URLs, saved runs-table views) are built in
  ``views``; the experiment is declared a model-training experiment when it is created.

Modules import downward only: uris, redact, views -> errors, journal -> sampler_model -> ops -> tracker.
"""

from tasks.tracking.errors import TrackingError
from tasks.tracking.redact import flatten_params, redact
from tasks.tracking.sampler_model import MODEL_NAME, load_sampler_from_mlflow
from tasks.tracking.tracker import Tracker

__all__ = ["MODEL_NAME", "Tracker", "TrackingError", "flatten_params", "load_sampler_from_mlflow", "redact"]
