"""The file MLflow loads as each logged model (models from code): see fmnist/tracking/pyfunc.py."""
from mlflow.models import set_model

from fmnist.tracking.pyfunc import PyfuncClassifier

set_model(PyfuncClassifier())
