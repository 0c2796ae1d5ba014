"""How work arrives: the MLflow webhook (signature check), the bridge app, the Prefect launcher."""
