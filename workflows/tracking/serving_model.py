"""The pyfunc's entry point, logged by path (MLflow's "models from code"): loading a published
version runs this file, not pickled bytes, so serving or evaluating a model never unpickles code.
Its prompt templates arrive through the logged ``model_config`` (see ``registry.log_pyfunc``)."""

import mlflow.models

from workflows.tracking.serving import ClipPyfunc

mlflow.models.set_model(ClipPyfunc())
