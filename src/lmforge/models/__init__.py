"""A trained model's life after training: evaluation, the MLflow pyfunc that
scores text, registration in the MLflow model registry, and the promotion gate."""
