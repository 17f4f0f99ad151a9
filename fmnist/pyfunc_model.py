"""The file that *is* the logged pyfunc model (MLflow's models-from-code, instead of pickling an object)."""
import mlflow

from fmnist.tracking import PyfuncClassifier

mlflow.models.set_model(PyfuncClassifier())
