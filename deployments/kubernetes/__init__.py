"""The kubernetes platform: TorchServe per model version on a cluster (objects, applier, backend) and the Gateway
API router, each behind the release's Protocols."""
