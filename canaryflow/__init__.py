"""canaryflow: release pipeline for ML models (MLflow -> Prefect -> TorchServe)."""
