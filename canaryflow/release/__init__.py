"""The release: begin/fetch/gates/stage/promote/stop, the canary ramp, rollback and reconcile."""
